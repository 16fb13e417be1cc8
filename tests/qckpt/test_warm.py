"""The warm tier: each branch head stored raw, replaced as the head moves, a cache that is never wrong."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import tracemalloc
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qckpt
from bench.workload import Trainer, train_step
from concurrent.futures import ThreadPoolExecutor

from qckpt.format.ids import digest
from qckpt.format.records import TensorEntry
from qckpt.format.warm import WARM_TRAILER_SIZE, _batches, build_warm, check_warm_trailer, verify_warm
from qckpt.store.store import REPOSITORY_VERSION

STEPS = 4


def _train_and_commit(repo: qckpt.Repository, trainer: Trainer, steps: int = STEPS, branch: str = "main") -> None:
    for _ in range(steps):
        train_step(trainer.state)
        repo.commit(trainer.state, branch=branch)


def _tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the live state (model and optimizer), by path."""
    out = {f"model/{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for i, s in trainer.optimizer.state_dict()["state"].items():
        out.update({f"optimizer/{i}/{k}": v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _warm_ids(path: Path) -> list[str]:
    return sorted(os.listdir(path / "warm")) if (path / "warm").exists() else []


def _restored(path: Path, revision: str = "main", **options: object) -> Trainer:
    fresh = Trainer("tiny", total_steps=50, seed=99)  # other initial values: everything must come from the repository
    with qckpt.Repository.open(path, **options) as repo:  # type: ignore[arg-type]
        repo.restore(fresh.state, revision)
    return fresh


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def trained(path: Path) -> tuple[Path, Trainer]:
    """A local repository with STEPS commits of real training on main, closed."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path) as repo:
        _train_and_commit(repo, trainer)
    return path, trainer


def test_the_head_restores_from_its_warm_copy_alone(trained: tuple[Path, Trainer], tmp_path: Path) -> None:
    path, trainer = trained
    with qckpt.Repository.open(path) as repo:
        head = repo.snapshot("main")
        parent = head.parents[0]
    assert _warm_ids(path) == [head.id]  # one copy: the predecessor's was replaced
    shutil.move(path / "packs", tmp_path / "packs")  # no pack can be read: only the warm copy can serve
    fresh = _restored(path)
    assert _same(_tensors(fresh), _tensors(trainer)) and fresh.state.step == trainer.state.step
    with qckpt.Repository.open(path) as repo, pytest.raises(qckpt.IntegrityError):
        repo.load(parent).tree()  # older snapshots have no warm copy
    shutil.move(tmp_path / "packs", path / "packs")


def test_only_reads_of_most_of_a_warm_copy_map_it_whole(trained: tuple[Path, Trainer], monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazy read of one tensor maps the warm copy without reading the whole file
    ahead (on a large copy, that reads it all from disk); restores and whole trees do."""
    path, trainer = trained
    asked: list[bool] = []
    real = qckpt.LocalBackend.map
    monkeypatch.setattr(qckpt.LocalBackend, "map", lambda self, key, whole=True: asked.append(whole) or real(self, key, whole))
    with qckpt.Repository.open(path, hot_snapshots=0) as repo:
        view = repo.load("main")
        one = next(p for p in view if p.startswith("components/model/"))
        assert torch.equal(view[one], trainer.model.state_dict()[one.removeprefix("components/model/")])
        assert asked == [False]
        repo.load("main").tree()
        repo.restore(Trainer("tiny", total_steps=50, seed=99).state, "main")
    assert asked == [False, True, True]


def test_resume_from_the_warm_copy_is_bit_exact(trained: tuple[Path, Trainer]) -> None:
    """Training on from a warm restore (in place, hot tier mapped read-only) matches
    training on without interruption, and its commits predict from the mapped base."""
    path, trainer = trained
    fresh = Trainer("tiny", total_steps=50, seed=99)
    with qckpt.Repository.open(path, hot_snapshots=1) as repo:
        repo.restore(fresh.state, "main")  # sets the process's RNG states to the head's too
        expected = [train_step(trainer.state) for _ in range(3)]  # the uninterrupted run
        repo.restore(fresh.state, "main")  # from the hot tier now, whose buffers map the warm copy
        for loss in expected:  # the mapped hot snapshot is evicted (hot_snapshots=1): never recycled for staging
            assert train_step(fresh.state) == loss
            snap = repo.commit(fresh.state)
            assert snap.stats.new_stored_bytes < snap.stats.new_raw_bytes / 2  # predicted from the previous head
        assert _same(_tensors(fresh), _tensors(trainer))
    assert _same(_tensors(_restored(path, warm=False)), _tensors(trainer))
    assert _warm_ids(path) == [snap.id]


def test_a_lazy_load_of_one_tensor_maps_the_warm_copy_and_reads_no_pack(tmp_path: Path) -> None:
    class CountingBackend(qckpt.LocalBackend):
        pack_reads = 0

        def get_range(self, key: str, offset: int, length: int) -> bytes:
            self.pack_reads += key.startswith("packs/")
            return super().get_range(key, offset, length)

    backend = CountingBackend(tmp_path / "r")
    with qckpt.Repository.init(backend, chunk_size=256) as repo:
        repo.commit({"small": torch.arange(4.0), "big": torch.randn(100, 100)})
    with qckpt.Repository.open(backend) as repo:
        assert torch.equal(repo.load("main")["small"], torch.arange(4.0)) and backend.pack_reads == 0


def test_a_damaged_warm_copy_falls_back_to_the_packs(trained: tuple[Path, Trainer], caplog: pytest.LogCaptureFixture) -> None:
    path, trainer = trained
    (copy,) = (path / "warm").iterdir()
    pristine = copy.read_bytes()
    for damage in (lambda b: b[:1000] + bytes([b[1000] ^ 1]) + b[1001:],  # a flipped bit in a module's tensor
                   lambda b: b[:-WARM_TRAILER_SIZE - 1] + bytes([b[-WARM_TRAILER_SIZE - 1] ^ 1]) + b[-WARM_TRAILER_SIZE:],  # in the
                   # last tensor (not a module's): one the restore copies while it verifies
                   lambda b: b[:-WARM_TRAILER_SIZE - 7],  # truncated
                   lambda b: b"",
                   lambda b: b[:-8] + b"QCKWARM9"):  # fmt: skip
        copy.write_bytes(damage(pristine))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qckpt"):
            assert _same(_tensors(_restored(path)), _tensors(trainer))
        assert "warm copy" in caplog.text and "damaged" in caplog.text
        with qckpt.Repository.open(path) as repo:
            report = repo.fsck()
            assert not report.ok and "warm copy" in report.problems[0].subject
    os.remove(path / "packs" / sorted(os.listdir(path / "packs"))[-1])  # and the packs cannot serve either
    with pytest.raises(qckpt.IntegrityError):
        _restored(path)


def _warm_of(arrays: dict[str, np.ndarray], chunk_size: int) -> tuple[memoryview, list[TensorEntry]]:
    entries = [TensorEntry(path, "ndarray", "|u1", a.shape, chunk_size,
                           tuple(digest(a[i : i + chunk_size]) for i in range(0, a.size, chunk_size)))
               for path, a in arrays.items()]  # fmt: skip
    return memoryview(b"".join(bytes(p) for p in build_warm("ab" * 16, entries, arrays))), entries


@pytest.mark.parametrize("pool", [None, ThreadPoolExecutor(3)])
def test_verifying_a_warm_copy_fills_the_copies_asked_for_and_names_the_first_damage(pool: ThreadPoolExecutor | None) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.integers(0, 256, size, dtype=np.uint8) for i, size in enumerate([1000, 0, 77, 4096, 3000])}
    body, entries = _warm_of(arrays, chunk_size=256)
    offsets = check_warm_trailer(body[-WARM_TRAILER_SIZE:], len(body), "ab" * 16, entries)
    into = [np.zeros(e.nbytes, dtype=np.uint8) if i % 2 else None for i, e in enumerate(entries)]
    verify_warm(body[:-WARM_TRAILER_SIZE], offsets, entries, pool, into)
    assert all(c is None or np.array_equal(c, arrays[e.path]) for e, c in zip(entries, into))
    damaged = bytearray(body)
    for entry, at in (("t4", 2999), ("t3", 300), ("t0", 999)):  # each flip comes before the last: it is the one named
        damaged[offsets[int(entry[1])] + at] ^= 1
        with pytest.raises(qckpt.IntegrityError, match=f"'{entry}'.*bytes {offsets[int(entry[1])] + at // 256 * 256}-"):
            verify_warm(memoryview(damaged), offsets, entries, pool, into)


@given(lengths=st.lists(st.integers(1, 1 << 20), max_size=40), count=st.integers(1, 16))
def test_verification_batches_keep_every_span_in_order_and_are_at_most_one_per_core(lengths: list[int], count: int) -> None:
    spans = [(None, i, length, b"", None) for i, length in enumerate(lengths)]
    runs = _batches(spans, count)  # type: ignore[arg-type]
    assert [s for run in runs for s in run] == spans and len(runs) <= count
    assert all(runs) or not spans


def test_a_warm_copy_of_another_snapshot_is_refused(trained: tuple[Path, Trainer]) -> None:
    path, trainer = trained
    with qckpt.Repository.open(path) as repo:
        repo.create_branch("old", "main@2")
        old = repo.snapshot("old")
        head = repo.snapshot("main")
    shutil.copy(path / "warm" / head.id, path / "warm" / old.id)  # right format, wrong manifest
    with qckpt.Repository.open(path) as repo:
        assert repo._store.read_buffers(old, list(repo.manifest(old).tensors)).warm is False
        assert not repo.fsck().ok


def test_interval_cadence_and_catch_up(path: Path) -> None:
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path, warm_interval=math.inf) as repo:
        _train_and_commit(repo, trainer, 2)
        assert _warm_ids(path) == []
        repo.flush()  # writes what is due
        assert _warm_ids(path) == [repo.snapshot("main").id]
        _train_and_commit(repo, trainer, 1)
        with qckpt.Repository.open(path) as other:  # someone else moves the branch: theirs to warm
            other.commit({"w": torch.ones(3)}, branch="main")
        repo.flush()
        assert repo.snapshot("main").id in _warm_ids(path)
    with qckpt.Repository.open(path, warm_interval=math.inf) as repo:
        _train_and_commit(repo, trainer, 1, branch="side")
        side = repo.snapshot("side").id
    assert side in _warm_ids(path)  # close writes it


def test_no_warm_copies_when_disabled(path: Path) -> None:
    with qckpt.Repository.init(path, warm=False) as repo:
        _train_and_commit(repo, Trainer("tiny", total_steps=50), 2)
        assert repo.stats().warm_bytes == 0
    assert _warm_ids(path) == []
    with pytest.raises(qckpt.InvalidInputError):
        qckpt.Repository.open(path, warm_interval=-1)


def test_a_kept_warm_copy_outlives_its_head_serves_restores_and_goes_after(path: Path, tmp_path: Path) -> None:
    """``keep_warm``: the copy of a head that the branch moves past stays while kept,
    and restoring that snapshot (in a new process, with no pack to read) reads it;
    released, it is deleted, and a kept copy that is still a head stays."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path) as repo:
        _train_and_commit(repo, trainer, 2)
        origin = repo.snapshot("main")
        expected = _tensors(trainer)
        with repo.keep_warm(origin) as kept, repo.keep_warm("main"):  # kept twice: the first release deletes nothing
            assert kept == origin
            _train_and_commit(repo, trainer, 3)
            repo.flush()
            assert _warm_ids(path) == sorted([origin.id, repo.snapshot("main").id])
            shutil.move(path / "packs", tmp_path / "packs")  # only the warm copy can serve
            assert _same(_tensors(_restored(path, origin.id)), expected)
            shutil.move(tmp_path / "packs", path / "packs")
        repo.flush()
        assert _warm_ids(path) == [repo.snapshot("main").id]
        head = repo.snapshot("main")
        with repo.keep_warm(head):
            pass
        repo.flush()
        assert _warm_ids(path) == [head.id]
        assert repo.fsck().ok and repo.gc().warm_copies_deleted == 0


def test_a_commit_without_a_warm_copy_deletes_the_copy_it_replaces(path: Path) -> None:
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path) as repo:
        _train_and_commit(repo, trainer, 2)
        origin = repo.snapshot("main")
        assert _warm_ids(path) == [origin.id]
        train_step(trainer.state)
        listed: list[str] = []
        list_refs = repo.backend.list_refs
        repo.backend.list_refs = lambda prefix: listed.append(prefix) or list_refs(prefix)  # type: ignore[method-assign]
        repo.commit(trainer.state, branch="future", warm=False)  # starts from main's head, which keeps its copy
        del repo.backend.list_refs
        assert _warm_ids(path) == [origin.id] and not listed  # no copy to replace: no request for one
        train_step(trainer.state)
        repo.commit(trainer.state, branch="future")  # a copy again
        assert _warm_ids(path) == sorted([origin.id, repo.snapshot("future").id])
        train_step(trainer.state)
        repo.commit(trainer.state, branch="future", warm=False)  # the branch's copy is replaced by none
        assert _warm_ids(path) == [origin.id]
        _train_and_commit(repo, Trainer("tiny", total_steps=50), 1, branch="other")
        repo.commit({"w": torch.ones(2)}, branch="main", warm=False)
        assert origin.id not in _warm_ids(path)  # main's new head has none: the old one's is replaced
        assert repo.fsck().ok and repo.gc().warm_copies_deleted == 0
        with pytest.raises(qckpt.InvalidInputError, match="warm must be True or False"):
            repo.commit({"w": torch.ones(2)}, warm=None)  # type: ignore[arg-type]
    with qckpt.Repository.open(path) as repo:  # every head restores, from its packs
        for branch in ("main", "future", "other"):
            repo.load(branch).tree()


def test_branches_keep_their_own_warm_copies_and_gc_removes_stale_ones(trained: tuple[Path, Trainer]) -> None:
    path, trainer = trained
    with qckpt.Repository.open(path) as repo:
        repo.create_branch("fork", "main")
        fork_head = repo.snapshot("fork").id
        _train_and_commit(repo, trainer, 1)  # main moves on; the old head is still fork's head: its copy stays
        main_head = repo.snapshot("main").id
        assert set(_warm_ids(path)) == {fork_head, main_head}
        stats = repo.stats()
        assert stats.warm_bytes == sum((path / "warm" / i).stat().st_size for i in _warm_ids(path)) > 0
        repo.delete_branch("fork")
        shutil.copy(path / "warm" / main_head, path / "warm" / repo.snapshot("main@2").id)  # as a crash leaves them
        assert repo.gc(dry_run=True).warm_copies_deleted == 2 and len(_warm_ids(path)) == 3
        assert repo.gc().warm_copies_deleted == 2  # a deleted branch's copy and one left by a crash
        assert _warm_ids(path) == [main_head] and repo.fsck().ok


def test_s3_restore_downloads_the_warm_copy(s3_uri: str, tmp_path: Path) -> None:
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(s3_uri, warm_interval=math.inf) as repo:
        _train_and_commit(repo, trainer, 2)
        assert repo.stats().warm_bytes == 0  # remote: copies wait for their interval (here: for close)
    fresh = Trainer("tiny", total_steps=50, seed=99)
    with qckpt.Repository.open(s3_uri, cache_dir=tmp_path / "fresh-cache") as repo:
        assert repo.stats().warm_bytes > 0
        s3 = repo.backend.inner  # type: ignore[attr-defined]
        snap = repo.snapshot("main")
        assert repo._store.read_buffers(snap, list(repo.manifest(snap).tensors)).warm
        before = s3.requests.get("get_object", 0)
        repo.restore(fresh.state)
        assert s3.requests.get("get_object", 0) - before == 2  # the ref and the warm copy (manifest cached): no pack
    assert _same(_tensors(fresh), _tensors(trainer))
    with qckpt.Repository.open(s3_uri, cache_dir=tmp_path / "second") as repo:  # the download overlaps the records'
        s3 = repo.backend.inner  # type: ignore[attr-defined]
        repo.restore(fresh.state)
        assert s3.requests.get("get_object", 0) == 5  # config, ref, snapshot, manifest, warm copy: fetched once
        repo.backend.delete(f"warm/{repo.resolve('main')}")
    third = Trainer("tiny", total_steps=50, seed=7)
    with qckpt.Repository.open(s3_uri, cache_dir=tmp_path / "third") as repo:
        repo.restore(third.state)  # the prefetch finds no copy: the packs serve
    assert _same(_tensors(third), _tensors(trainer))


def test_old_repositories_gain_the_warm_tier_on_their_next_commit(tmp_path: Path) -> None:
    golden = Path(__file__).parents[1] / "golden" / "v3"
    shutil.copytree(golden, tmp_path / "v3")
    with qckpt.Repository.open(tmp_path / "v3") as repo:
        assert repo.config.version == 3 and repo.stats().warm_bytes == 0
        snap = repo.commit({"w": torch.arange(10.0)})
        assert repo.config.version == REPOSITORY_VERSION >= 4
        assert _warm_ids(tmp_path / "v3") == [snap.id]


GC_RACE_CHILD = textwrap.dedent(
    """
    import sys, qckpt
    from bench.workload import Trainer, train_step
    trainer = Trainer("tiny", total_steps=500)
    repo = qckpt.Repository.open(sys.argv[1])
    print("ready", flush=True)
    while True:
        train_step(trainer.state)
        repo.commit(trainer.state)
    """
)


def _check_after_crash(path: Path) -> None:
    """The head restores (from its warm copy or its packs, bit for bit the same), fsck is
    clean, and GC leaves exactly the heads' copies."""
    with qckpt.Repository.open(path) as repo:
        head = repo.snapshot("main")
        manifest = repo.manifest(head)
        read = repo._store.read_buffers(head, list(manifest.tensors))
        chain = repo._store._read_byte_ranges(head, [(e, 0, e.nbytes) for e in manifest.tensors])
        assert all(bytes(a) == bytes(b) for a, b in zip(read.writable, chain))
        assert repo.fsck().ok
        repo.gc()
        assert set(_warm_ids(path)) <= set(repo.branches().values())


def test_sigkill_while_warm_copies_are_replaced(path: Path) -> None:
    qckpt.Repository.init(path).close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    for delay in (1.5, 2.2, 2.9):
        child = subprocess.Popen([sys.executable, "-c", GC_RACE_CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        _check_after_crash(path)


def test_gc_racing_head_replacement(path: Path) -> None:
    trainer = Trainer("tiny", total_steps=500)
    errors: list[BaseException] = []
    with qckpt.Repository.init(path) as repo:
        _train_and_commit(repo, trainer, 1)
        stop = threading.Event()

        def collect() -> None:
            with qckpt.Repository.open(path) as other:
                while not stop.is_set():
                    try:
                        other.gc(qckpt.RetentionPolicy(keep_last=2))
                    except Exception as e:  # reported below
                        errors.append(e)
                        return

        collector = threading.Thread(target=collect)
        collector.start()
        try:
            _train_and_commit(repo, trainer, 12)
        finally:
            stop.set()
            collector.join()
    assert not errors, errors
    _check_after_crash(path)
    assert _same(_tensors(_restored(path)), _tensors(trainer))


def test_a_module_that_keeps_what_it_loads_never_corrupts_a_delta_base(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Restores hand modules the hot tier's (or the read's) own buffers, since
    ``load_state_dict`` copies; a module that keeps them instead is detected and
    the snapshot is not used as a delta base, so training on cannot corrupt one:
    from a mapped warm copy, from the packs, and from a warm copy that was not
    mapped but read whole (a memory backend, as S3)."""

    class Keeper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4096))

        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def, override]
            self.w = torch.nn.Parameter(state_dict["w"])  # keeps the given tensor

    for location, warm in ((tmp_path / "warm", True), (tmp_path / "packs", False), (qckpt.MemoryBackend(), True)):
        keeper = Keeper()
        state = qckpt.TrainingState(model=keeper, rng=False)
        with qckpt.Repository.init(location, chunk_size=1024, warm=warm) as repo:
            with torch.no_grad():
                keeper.w.copy_(torch.arange(4096.0))
            first = repo.commit(state)
            for source in ("hot", "storage"):
                if source == "storage":
                    repo._hot.discard(first.id)
                    assert repo._store.read_buffers(first, list(repo.manifest(first).tensors)).warm is warm
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="qckpt"):
                    repo.restore(state, first.id)
                assert "kept the tensors" in caplog.text  # detected, whatever the source
                with torch.no_grad():
                    keeper.w.mul_(2)  # writes where the module keeps it
                repo.create_branch(f"from-{source}", first.id)  # so the next commit's base is the restored snapshot
                second = repo.commit(state, branch=f"from-{source}")
                assert torch.equal(repo.load(second.id)["components/model/w"], torch.arange(4096.0) * 2)
                assert torch.equal(repo.load(first.id)["components/model/w"], torch.arange(4096.0))


INTERVAL_CHILD = textwrap.dedent(
    """
    import math, os, sys, qckpt
    from bench.workload import Trainer, train_step
    trainer = Trainer("tiny", total_steps=50)
    repo = qckpt.Repository.init(sys.argv[1], warm_interval=math.inf)
    train_step(trainer.state)
    repo.commit(trainer.state)
    repo.flush()  # the first snapshot's warm copy
    print(os.listdir(os.path.join(sys.argv[1], "packs"))[0], flush=True)
    for _ in range(3):  # predicted from it, chunk by chunk, with no copies of their own
        train_step(trainer.state)
        repo.commit(trainer.state)
    os._exit(0)  # dies before close would write the head's copy
    """
)


def test_a_head_without_a_warm_copy_decodes_only_back_to_the_nearest_one(path: Path, tmp_path: Path) -> None:
    """After a crash under an interval cadence, the head's chains stop at the nearest
    ancestor's warm copy: the packs older than it are not needed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    child = subprocess.run([sys.executable, "-c", INTERVAL_CHILD, str(path)], capture_output=True, text=True, env=env)
    assert child.returncode == 0, child.stderr
    first_pack = child.stdout.strip()
    expected = _tensors(_restored(path))
    (copy,) = os.listdir(path / "warm")
    shutil.move(path / "packs" / first_pack, tmp_path / first_pack)  # the keyframes the chains start from
    assert _same(_tensors(_restored(path)), expected)
    os.remove(path / "warm" / copy)  # without the ancestor's copy the chains need the missing keyframes
    with pytest.raises(qckpt.IntegrityError, match="missing"):
        _restored(path)


PREEMPTED_CHILD = textwrap.dedent(
    """
    import math, sys, time, torch, qckpt
    repo = qckpt.Repository.init(sys.argv[1], warm_interval=math.inf)
    repo.flush_on_signal()
    repo.commit({"w": torch.arange(1000.0)})
    print(repo.snapshot("main").id, flush=True)
    time.sleep(60)
    """
)


def test_sigterm_writes_the_warm_copy_still_due_then_ends_the_process(path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", PREEMPTED_CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    head = child.stdout.readline().strip()
    assert _warm_ids(path) == []  # the cadence has not written it yet
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM  # the default action still ends the process
    assert _warm_ids(path) == [head]


def test_a_signal_after_close_goes_to_the_previous_handler_without_an_error(path: Path) -> None:
    received: list[int] = []
    original = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        repo = qckpt.Repository.init(path, warm_interval=math.inf)
        repo.flush_on_signal(signal.SIGUSR1)
        repo.commit({"w": torch.arange(10.0)})
        repo.close()  # writes the warm copy due; the handler then has nothing left to do
        os.kill(os.getpid(), signal.SIGUSR1)  # a RepositoryClosedError raised here would surface at a random line
        time.sleep(0.1)
        assert received == [signal.SIGUSR1] and len(_warm_ids(path)) == 1
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_flush_on_signal_refuses_what_it_cannot_handle(path: Path) -> None:
    with qckpt.Repository.init(path) as repo:
        with pytest.raises(qckpt.InvalidInputError):
            repo.flush_on_signal(signal.SIGKILL)
        refused: list[qckpt.InvalidInputError] = []

        def from_another_thread() -> None:
            try:
                repo.flush_on_signal()
            except qckpt.InvalidInputError as e:
                refused.append(e)

        thread = threading.Thread(target=from_another_thread)
        thread.start()
        thread.join()
        assert len(refused) == 1  # only the main thread may install handlers


def test_writing_a_warm_copy_does_not_assemble_it_in_memory(tmp_path: Path) -> None:
    """The copy is written from the staged tensors' own buffers: no state-sized buffer
    is allocated on the writer thread."""
    with qckpt.Repository.init(tmp_path / "repo", warm=False) as repo:
        snap = repo.commit({"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(3)})
        entries = list(repo.manifest(snap).tensors)
        view = repo.load(snap.id)
        arrays = {e.path: view[e.path].numpy().reshape(-1).view(np.uint8) for e in entries}
        tracemalloc.start()
        try:
            written = repo._store.warm.write(snap, entries, arrays)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert written > 4 << 20 and peak < 1 << 20, peak
        assert repo._store.read_buffers(snap, entries).warm  # and it is a sound copy


def test_a_warm_copy_kept_past_close_is_left_to_gc(path: Path) -> None:
    """A keep let go after ``close`` (a light cone collected after its repository
    closed) raises nothing; the copy stays until garbage collection removes it."""
    trainer = Trainer("tiny", total_steps=50)
    with qckpt.Repository.init(path) as repo:
        _train_and_commit(repo, trainer, 1)
        kept = repo.snapshot("main")
        keep = repo.keep_warm(kept)
        keep.__enter__()
        _train_and_commit(repo, trainer, 1)
    keep.__exit__(None, None, None)
    assert kept.id in _warm_ids(path)
    with qckpt.Repository.open(path) as repo:
        assert repo.gc().warm_copies_deleted == 1
        assert _warm_ids(path) == [repo.snapshot("main").id]
