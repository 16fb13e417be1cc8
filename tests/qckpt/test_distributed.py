"""torch.distributed.checkpoint on a qckpt repository: 2 gloo ranks on the CPU save a
sharded state as ordinary snapshots and load it back on 2 ranks (same or other
sharding) and in one process; a rank killed mid-save publishes nothing."""

from __future__ import annotations

import copy
import json
import multiprocessing
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.state_dict import get_state_dict

import qckpt
from qckpt.distributed import QckptReader, QckptWriter, optimizer_rules
from qckpt.cli import main as qckpt_cli
from qckpt.commit.arrays import DEFERRED_NOTE
from qckpt.format.codecs import DeferredCodec
from tests.qckpt.distributed_workload import full_state, rank_main

pytestmark = pytest.mark.slow


def _start(tmp_path: Path, location: str, task: str, world: int = 2) -> tuple[list[Any], Path]:
    """Start ``task`` on ``world`` spawned gloo ranks (a job of its own)."""
    run = tmp_path / f"{task}-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=rank_main, args=(r, world, str(run / "rendezvous"), location, task, str(run)))
             for r in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    return procs, run


def _ranks(tmp_path: Path, location: str, task: str, world: int = 2) -> tuple[list[int | None], list[dict[str, Any]]]:
    """Run ``task`` on ``world`` spawned gloo ranks; (exit codes, what each rank reported)."""
    return _join(*_start(tmp_path, location, task, world))


def _join(procs: list[Any], run: Path) -> tuple[list[int | None], list[dict[str, Any]]]:
    world = len(procs)
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    reports = [json.loads((run / f"rank{r}.json").read_text()) if (run / f"rank{r}.json").exists() else {} for r in range(world)]
    return [p.exitcode for p in procs], reports


def _load_in_one_process(location: str | Path, revision: str = "main") -> dict[str, Any]:
    state = {"w": torch.zeros(8, 6), "emb": torch.zeros(4, 6, dtype=torch.bfloat16), "bias": torch.zeros(6),
             "meta": {"step": -1, "name": ""}}  # fmt: skip
    reader = QckptReader(location, revision)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader)
    reader.close()
    return state


def _assert_state(state: dict[str, Any], step: int) -> None:
    expected = full_state(step)
    for key in ("w", "emb", "bias"):
        assert torch.equal(state[key], expected[key]), key
    assert state["meta"] == expected["meta"]


def test_two_ranks_save_snapshots_that_load_on_two_ranks_and_in_one_process(tmp_path: Path) -> None:
    location = str(tmp_path / "repo")
    qckpt.Repository.init(location).close()
    codes, reports = _ranks(tmp_path, location, "save")
    assert codes == [0, 0], reports
    with qckpt.Repository.open(location) as repo:
        log = repo.log("main")
        assert [s.step for s in log] == [3, 2, 1]  # one ordinary snapshot per dcp.save, parented in order
        assert reports[0]["snapshot"] == log[0].id and reports[1]["snapshot"] is None  # rank 0 coordinated
        assert log[0].stats.raw_bytes == 8 * 6 * 4 + 4 * 6 * 2 + 6 * 4  # each tensor once: DCP wrote the replica once
        assert repo.fsck().ok
        view = repo.load("main")
        assert sorted(view) == ["dcp/tensors/bias", "dcp/tensors/emb@0,0", "dcp/tensors/emb@2,0",
                                "dcp/tensors/w@0,0", "dcp/tensors/w@4,0"]  # fmt: skip
        assert torch.equal(view["dcp/tensors/w@4,0"], full_state(3)["w"][4:])
        assert all(len(s.warm_parts) == 2 for s in log)  # each rank wrote the raw copy of its part
        repo.gc()
        assert repo.fsck().ok
        warm = set(repo._store.warm.snapshot_ids())
        assert set(log[0].warm_parts) <= warm and not warm & {p for s in log[1:] for p in s.warm_parts}
    _assert_state(_load_in_one_process(location), 3)  # 2 ranks -> 1 process
    _assert_state(_load_in_one_process(location, "main@1"), 1)  # any revision
    for task in ("load", "load-dim1"):  # 2 ranks -> 2 ranks, as saved and resharded along the other dimension
        codes, reports = _ranks(tmp_path, location, task)
        assert codes == [0, 0] and all(all(r["equal"].values()) for r in reports), reports


def test_a_rank_killed_mid_save_publishes_nothing(tmp_path: Path) -> None:
    location = str(tmp_path / "repo")
    qckpt.Repository.init(location).close()
    assert _ranks(tmp_path, location, "save")[0] == [0, 0]
    with qckpt.Repository.open(location) as repo:
        head = repo.snapshot("main").id
    codes, reports = _ranks(tmp_path, location, "die")
    assert codes[1] == 3 and reports[0]["error"], (codes, reports)  # the coordinator's save failed, loudly
    with qckpt.Repository.open(location) as repo:
        assert repo.snapshot("main").id == head  # the branch never names a partial snapshot
        assert repo.fsck().ok
        repo.gc()  # the coordinator's lock went with its process: GC runs
    _assert_state(_load_in_one_process(location), 3)


def test_s3_and_two_jobs_at_once_on_two_branches(tmp_path: Path, s3_uri: str) -> None:
    qckpt.Repository.init(s3_uri).close()
    jobs = [_start(tmp_path, s3_uri, task) for task in ("save", "save-other-branch")]  # 2 jobs x 2 ranks, concurrently
    assert [_join(*job)[0] for job in jobs] == [[0, 0], [0, 0]]
    _assert_state(_load_in_one_process(s3_uri, "main"), 3)
    _assert_state(_load_in_one_process(s3_uri, "other"), 3)
    with qckpt.Repository.open(s3_uri) as repo:
        assert repo.snapshot("main").manifest == repo.snapshot("other").manifest  # same contents, stored once
        assert repo.fsck().ok


def test_the_native_api_commits_and_restores_sharded_states_on_every_rank(tmp_path: Path) -> None:
    location = str(tmp_path / "repo")
    qckpt.Repository.init(location).close()
    codes, reports = _ranks(tmp_path, location, "native")
    assert codes == [0, 0], reports
    assert reports[0]["ids"] == reports[1]["ids"] and len(set(reports[0]["ids"])) == 3  # one snapshot per collective commit
    assert all(r["equal"] and r["restored"] == r["ids"][-1] for r in reports)
    assert all("Repository.commit on every rank" in r["commit_async"] for r in reports)
    assert all("sharded DTensor" in r["plain"] and "QckptWriter" in r["plain"] for r in reports)
    assert all("does not fit" in r["mismatch"] and "Size mismatch" in r["mismatch"] and r["untouched"] for r in reports)
    with qckpt.Repository.open(location) as repo:
        history = repo.log("native")
        assert [s.step for s in history] == [3, 2, 1] and history[0].metrics == {"x": 1.0} and history[0].message == "commit"
        assert repo.fsck().ok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sharded_cuda_run_on_nccl_resumes_bit_exactly(tmp_path: Path) -> None:
    location = str(tmp_path / "repo")
    qckpt.Repository.init(location).close()
    codes, reports = _ranks(tmp_path, location, "cuda", world=torch.cuda.device_count())
    assert all(c == 0 for c in codes) and all(r["equal"] for r in reports), (codes, reports)


def test_readers_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        with pytest.raises(qckpt.RevisionNotFoundError):
            QckptReader(repo, "nope")
        repo.commit({"w": torch.ones(2)}, branch="plain")
        with pytest.raises(qckpt.InvalidInputError, match="not written by dcp.save"):
            QckptReader(repo, "plain")
        with pytest.raises(qckpt.InvalidRefNameError):
            QckptWriter(repo, "bad..name")


def test_saves_dedup_unchanged_chunks_and_delta_encode_against_the_writers_previous_save(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    frozen, weights = torch.randn(256, 256, generator=g), torch.randn(512, 512, generator=g)
    steps = [{"frozen": frozen, "w": weights}, {"frozen": frozen, "w": weights + 1e-3 * torch.randn(512, 512, generator=g)}]
    stored = {}
    for keep in (True, False):
        with qckpt.Repository.init(tmp_path / f"repo-{keep}") as repo, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            writer = QckptWriter(repo, defer_encoding=False)  # the snapshot's stats are the encoded sizes
            for state in steps:
                dcp.save(state, storage_writer=writer if keep else QckptWriter(repo, defer_encoding=False))
            second = repo.snapshot("main").stats
            assert second.new_chunks < second.chunks  # the frozen tensor's chunks were not written again
            stored[keep] = second.new_stored_bytes
    assert stored[True] < 0.9 * stored[False], stored  # deltas against the kept writer's previous save


def _train_and_save(repo: qckpt.Repository, steps: int, defer_encoding: bool = False) -> dict[str, Any]:
    """Train a small model ``steps`` AdamW steps, each saved; returns the last state dicts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    writer = QckptWriter(repo, defer_encoding=defer_encoding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            model(torch.randn(16, 64)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
    writer.close()
    return copy.deepcopy({"model": model_sd, "optim": optim_sd})


def test_deferred_encoding_stores_what_encoding_at_once_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A save returns once its chunks are stored raw; the compaction on the writer's
    thread then stores exactly the objects the inline encoding stores (same codec,
    dependencies and bytes per chunk) and deletes the raw packs."""
    layouts, states = {}, {}
    for defer in (True, False):
        with qckpt.Repository.init(tmp_path / f"repo-{defer}") as repo:
            states[defer] = _train_and_save(repo, 6, defer_encoding=defer)
            store = repo._store
            chunks = {c for s in repo.log("main") for e in repo.manifest(s).tensors for c in e.chunks}
            layouts[defer] = {c: (loc.codec, loc.deps, loc.length) for c in chunks if (loc := store.locate(c)) is not None}
            assert len(layouts[defer]) == len(chunks)
            assert {c for p in store.pack_ids() for c in store.pack_contents(p)} == chunks  # no raw duplicates left
            assert repo.fsck().ok
            assert repo.snapshot("main").stats.notes == ((DEFERRED_NOTE,) if defer else ())
        assert qckpt_cli(["-R", str(tmp_path / f"repo-{defer}"), "show", "main"]) == 0
        assert (DEFERRED_NOTE in capsys.readouterr().out) == defer  # what the commit wrote is the raw size
    assert layouts[True] == layouts[False]
    assert any(deps for _, deps, _ in layouts[True].values())  # predicted, not only stored
    assert DeferredCodec.id not in {codec for codec, _, _ in layouts[True].values()}
    for defer in (True, False):
        loaded = copy.deepcopy(states[defer])
        for value in [*loaded["model"].values(), *(v for s in loaded["optim"]["state"].values() for v in s.values())]:
            if isinstance(value, torch.Tensor) and value.dim():
                value.zero_()
        with qckpt.Repository.open(tmp_path / f"repo-{defer}") as repo:
            dcp.load(loaded, storage_reader=QckptReader(repo, "main"))
        assert all(torch.equal(loaded["model"][k], v) for k, v in states[True]["model"].items())
        assert all(torch.equal(torch.as_tensor(loaded["optim"]["state"][p][k]), torch.as_tensor(v))
                   for p, s in states[True]["optim"]["state"].items() for k, v in s.items())  # fmt: skip


def test_deferred_encoding_on_s3(s3_uri: str) -> None:
    """Off by default there (the raw bytes are an upload), and compacts as on disk when asked."""
    with qckpt.Repository.init(s3_uri) as repo:
        assert not QckptWriter(repo)._defer
        state = _train_and_save(repo, 3, defer_encoding=True)
        store = repo._store
        chunks = {c for s in repo.log("main") for e in repo.manifest(s).tensors for c in e.chunks}
        stored = {c: loc for p in store.pack_ids() for c, loc in store.pack_contents(p).items()}
        assert stored.keys() == chunks and DeferredCodec.id not in {loc.codec for loc in stored.values()}
        assert any(loc.deps for loc in stored.values()) and repo.fsck().ok
        loaded = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
        dcp.load(loaded, storage_reader=QckptReader(repo, "main"))
        assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())


def test_a_failed_compaction_is_raised_by_the_next_save_and_loses_nothing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def fail(*args: Any, **kwargs: Any) -> int:
        raise qckpt.BackendError("disk on fire")

    monkeypatch.setattr("qckpt.distributed.compact", fail)
    with qckpt.Repository.init(tmp_path / "repo") as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = QckptWriter(repo)
        dcp.save(full_state(1), storage_writer=writer)
        with pytest.raises(qckpt.BackendError, match="disk on fire"):
            writer.wait()
        monkeypatch.undo()
        dcp.save(full_state(2), storage_writer=writer)  # raised once: the next save goes on
        dcp.save(full_state(3), storage_writer=writer)
        writer.wait()  # the second and third saves compacted
        monkeypatch.setattr("qckpt.distributed.compact", fail)
        dcp.save(full_state(4), storage_writer=writer)
        writer._compactions[-1].exception(timeout=60)  # its compaction has failed before the next save
        with pytest.raises(CheckpointException, match="disk on fire"):  # DCP wraps what write_data raises
            dcp.save(full_state(5), storage_writer=writer)
        monkeypatch.undo()
        dcp.save(full_state(5), storage_writer=writer)
        writer.close()
        dcp.save(full_state(5), storage_writer=writer)  # a closed writer on an open repository saves on
        writer.close()
        repo.reset("main", "main~1")
        assert len(repo.log("main")) == 5 and repo.fsck().ok
        _assert_state(_load_in_one_process(tmp_path / "repo"), 5)
        for snapshot, step in zip(repo.log("main"), (5, 4, 3, 2, 1)):
            _assert_state(_load_in_one_process(tmp_path / "repo", snapshot.id), step)
            codecs = {repo._store.locate(c).codec for e in repo.manifest(snapshot).tensors for c in e.chunks}  # type: ignore[union-attr]
            assert (codecs == {DeferredCodec.id}) == (step in (1, 4)), step  # uncompacted: durable, readable, larger
        before = repo.stats().stored_bytes
        repo.gc()  # compresses what no compaction will: the deferred objects, each on its own
        assert repo.stats().stored_bytes <= before and repo.fsck().ok  # (these tiny tensors do not compress)
        stored = [loc for p in repo._store.pack_ids() for loc in repo._store.pack_contents(p).values()]
        assert DeferredCodec.id not in {loc.codec for loc in stored}
        for snapshot, step in zip(repo.log("main"), (5, 4, 3, 2, 1)):
            _assert_state(_load_in_one_process(tmp_path / "repo", snapshot.id), step)


def test_gc_between_saves_and_their_compactions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compactions held back until a GC has expired the first save: the first finds its
    chunks gone and stores nothing, the second encodes without that base; nothing
    deferred stays behind for the survivor, and everything reads back."""
    release = threading.Event()
    original = QckptWriter._compact
    monkeypatch.setattr(QckptWriter, "_compact", lambda self, *args: release.wait() and original(self, *args))
    with qckpt.Repository.init(tmp_path / "repo") as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = QckptWriter(repo)
        try:
            for step in (1, 2):
                dcp.save(full_state(step), storage_writer=writer)
            packs_before = set(repo._store.pack_ids())
            report = repo.gc(qckpt.RetentionPolicy(keep_last=1, keep_tagged=False, reflog_grace=0))
            assert report.snapshots_deleted == 1 and len(repo._store.pack_ids()) < len(packs_before)
        finally:
            release.set()
            writer.close()
        (head,) = repo.log("main")
        codecs = {repo._store.locate(c).codec for e in repo.manifest(head).tensors for c in e.chunks}  # type: ignore[union-attr]
        assert DeferredCodec.id not in codecs
        assert repo.fsck().ok and {c for p in repo._store.pack_ids() for c in repo._store.pack_contents(p)} == {
            c for e in repo.manifest(head).tensors for c in e.chunks}  # fmt: skip
    _assert_state(_load_in_one_process(tmp_path / "repo"), 2)


def test_adamw_state_in_dcp_state_dicts_is_predicted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with qckpt.Repository.init(tmp_path / "rules") as repo:
        planner = DefaultSavePlanner()
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        planner.set_up_planner({"model": model_sd, "optim": optim_sd}, is_coordinator=True)
        keys = [item.index.fqn for item in planner.create_local_plan().items if item.type != WriteItemType.BYTE_IO]
        rules = optimizer_rules(planner, keys)
        assert sorted(rules) == ["dcp/tensors/model.bias", "dcp/tensors/model.weight"]
        rule = rules["dcp/tensors/model.weight"]
        assert rule.kind == "adam" and rule.step == 1.0 and rule.hyper["lr"] == 1e-3 and rule.hyper["decoupled_weight_decay"]
        assert rule.state == {"exp_avg": "dcp/tensors/optim.state.weight.exp_avg",
                              "exp_avg_sq": "dcp/tensors/optim.state.weight.exp_avg_sq"}  # fmt: skip
    stored = {}
    for predicted in (True, False):
        if not predicted:
            monkeypatch.setattr("qckpt.distributed.optimizer_rules", lambda planner, keys: {})
        with qckpt.Repository.init(tmp_path / f"repo-{predicted}") as repo:
            _train_and_save(repo, 4)  # encoded at once: the snapshot's stats are the encoded sizes
            stored[predicted] = repo.snapshot("main").stats.new_stored_bytes
    assert stored[True] < 0.8 * stored[False], stored


def test_one_process_save_and_a_shape_mismatch_on_load(tmp_path: Path) -> None:
    """Without a process group DCP runs as one rank: the same code path, one snapshot."""
    with qckpt.Repository.init(tmp_path / "repo") as repo:
        writer = QckptWriter(repo, "main")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in (1, 2):
                writer.step, writer.metrics = step, {"loss": 1.0 / step}
                dcp.save(full_state(step), storage_writer=writer)
        assert writer.snapshot is not None and writer.snapshot.metrics == {"loss": 0.5}
        _assert_state(_load_in_one_process(repo), 2)
        wrong = {"w": torch.zeros(6, 8)}
        with warnings.catch_warnings(), pytest.raises(CheckpointException, match="(?i)size mismatch"):
            warnings.simplefilter("ignore")
            dcp.load(wrong, storage_reader=QckptReader(repo, "main"))


def test_gc_waits_while_a_coordinator_is_between_set_up_and_publishing(tmp_path: Path) -> None:
    """The ranks' packs are unreferenced until the coordinator publishes: GC must not run then."""
    import threading

    with qckpt.Repository.init(tmp_path / "repo") as repo, qckpt.Repository.open(tmp_path / "repo") as other:
        writer = QckptWriter(repo)
        writer.set_up_storage_writer(True)  # what dcp.save does first on the coordinator
        collected = threading.Event()
        gc = threading.Thread(target=lambda: (other.gc(), collected.set()))
        gc.start()
        assert not collected.wait(1.0)  # blocked behind the coordinator's shared lock
        writer.close()  # a failed save's lock goes with close (or the next save)
        gc.join(timeout=30)
        assert collected.is_set()


def test_checkpoint_id_names_the_branch_of_one_save_and_async_save_works(tmp_path: Path) -> None:
    with qckpt.Repository.init(tmp_path / "repo") as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = QckptWriter(repo, "main")
        dcp.save(full_state(1), storage_writer=writer, checkpoint_id="experiment")
        dcp.save(full_state(2), storage_writer=writer)  # back on the writer's own branch
        dcp.async_save(full_state(3), storage_writer=writer).result()  # staged, then written in the background
        assert [s.step for s in repo.log("experiment")] == [None] and len(repo.log("main")) == 2
        _assert_state(_load_in_one_process(repo, "main"), 3)
        _assert_state(_load_in_one_process(repo, "experiment"), 1)
        with pytest.raises(qckpt.InvalidRefNameError):
            dcp.save(full_state(1), storage_writer=writer, checkpoint_id="bad..name")


def test_a_training_state_commits_and_restores_through_dcp_in_one_process(tmp_path: Path) -> None:
    from bench.compare import differences

    def new_state() -> qckpt.TrainingState:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
        return qckpt.TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, gen=torch.Generator().manual_seed(5))

    def train(state: qckpt.TrainingState) -> None:
        model, optimizer = state.components["model"], state.components["optimizer"]
        model(torch.randn(4, 8, generator=state.components["gen"])).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        state.components["scheduler"].step()
        state.step += 1

    with qckpt.Repository.init(tmp_path / "repo") as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, writer = new_state(), QckptWriter(repo)
        for _ in range(3):
            train(state)
            snapshot = writer.commit(state, metrics={"loss": 1.0})
        assert snapshot is not None and snapshot.step == 3 and snapshot.metrics == {"loss": 1.0}
        saved = copy.deepcopy(state.capture())  # capture shares the live tensors
        train(state)
        expected = copy.deepcopy(state.capture())
        fresh = new_state()
        QckptReader(repo, "main").restore(fresh)
        assert differences(fresh.capture()["components"], saved["components"]) == [] and fresh.step == 3
        train(fresh)  # RNG (dropout, the generator) and scheduler restored: the same next step, bit for bit
        assert differences(fresh.capture()["components"], expected["components"]) == []
        stray = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
        with pytest.raises(qckpt.InvalidInputError, match="exactly one module"):
            writer.commit(qckpt.TrainingState(model=torch.nn.Linear(2, 2), optimizer=stray))


def test_restores_read_warm_parts_and_fall_back_to_the_packs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "repo"
    with qckpt.Repository.init(root) as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = QckptWriter(repo)
        for step in (1, 2):
            dcp.save(full_state(step), storage_writer=writer)
        writer.close()  # waits for the warm part written in the background
        (part,) = repo.snapshot("main").warm_parts
    copy_path = root / "warm" / part
    assert copy_path.exists()
    reads = []
    original = qckpt.Repository.read_arrays
    with pytest.MonkeyPatch.context() as patch:  # with a sound part, no tensor is read from the packs
        patch.setattr(qckpt.Repository, "read_arrays", lambda self, s, e: reads.append(e) or original(self, s, e))
        _assert_state(_load_in_one_process(root), 2)
        assert reads == []
        data = bytearray(copy_path.read_bytes())
        data[10] ^= 0xFF  # a damaged part: logged, then the packs
        copy_path.write_bytes(bytes(data))
        _assert_state(_load_in_one_process(root), 2)
        assert reads and "damaged" in caplog.text
        copy_path.unlink()  # no part at all: the packs
        _assert_state(_load_in_one_process(root), 2)
        (root / "manifests" / part).unlink()  # nor its manifest (a cache too: a crash may lose it)
        _assert_state(_load_in_one_process(root), 2)
        with qckpt.Repository.open(root) as repo:
            assert repo.fsck().ok


def test_names_with_slashes_and_percent_signs_round_trip(tmp_path: Path) -> None:
    """Keys are escaped once in tensor paths (the warm part's manifest once escaped them twice)."""
    state = {"enc/layer": torch.arange(6.0), "rate%": torch.ones(3)}
    with qckpt.Repository.init(tmp_path / "repo") as repo, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=QckptWriter(repo))
        assert len(repo.snapshot("main").warm_parts) == 1
        loaded = {"enc/layer": torch.zeros(6), "rate%": torch.zeros(3)}
        dcp.load(loaded, storage_reader=QckptReader(repo))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_manifests_are_laid_out_as_encode_tree_lays_out_the_tree() -> None:
    """The tensors' dict of a DCP manifest is written directly: it must be what
    ``encode_tree`` makes of the same tree (readers decode it with ``decode_tree``)."""
    from qckpt.distributed import _TENSORS, _manifest
    from qckpt.format.records import TensorEntry
    from qckpt.format.tree import encode_tree, join_path

    keys = ["enc/layer", "rate%", "w@512,0", "0"]
    entries = {k: TensorEntry(join_path(_TENSORS, k), "torch", "float32", (2,), 1 << 20, (bytes(16),)) for k in keys}
    plain = {"format": 1, "metadata": b"meta", "objects": {"o": b"x"}}
    manifest = _manifest(entries, **plain)
    encoded, leaves = encode_tree({"dcp": {**plain, "tensors": {k: torch.empty(0) for k in keys}}})
    assert manifest.tree == encoded
    assert [e.path for e in manifest.tensors] == [leaf.path for leaf in leaves]
