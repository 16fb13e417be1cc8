"""``python -m bench distributed``: two ranks (gloo on the CPU, one thread each)
train the reference model sharded with FSDP2 (``fully_shard`` on every block and
the model) with AdamW and dropout, each rank on its own batches, and checkpoint
every step through ``dcp.save`` twice: onto a qckpt repository
(``QckptWriter``, one snapshot per step) and with DCP's ``FileSystemWriter``
(a directory per step), in alternating order. Both store the same thing: the
rank's ``TrainingState`` as ``sharded_state_dict`` makes it (the model's and
the optimizer's sharded state dicts and, under a key per rank, that rank's
RNG states and batch sampler position); qckpt through ``QckptWriter.commit``
and ``QckptReader.restore``.

Reported (JSON keys): ``qckpt_bytes`` (the repository's stored bytes after every
step) and ``dcp_bytes`` (the step directories together); ``qckpt_commit_s`` and
``dcp_save_s`` (rank 0's mean wall time of one ``dcp.save``, which is what
training waits for); ``qckpt_restore_s`` and ``dcp_load_s`` (rank 0's
``dcp.load`` of the last step into fresh objects, best of two, alternating);
``bit_exact``: two new rank processes restore ``main@<half>`` and train to the
end, and their final checkpoint equals the first run's in every tensor (both
ranks' parameters, optimizer state, RNG and sampler states);
``resharded_restore``: one process without ``torch.distributed`` loads the last
snapshot into an unsharded model and optimizer, equal to the full state the
ranks trained. Ratios: ``bytes_ratio``, ``commit_ratio``, ``restore_ratio``
(qckpt / DCP). ``train_s``, ``qckpt_sync_train_s``, ``dcp_sync_train_s``,
``qckpt_async_train_s``, ``dcp_async_train_s``: rank 0's wall time of the same
training (fresh runs, same seeds) without checkpoints, with ``dcp.save`` every
step onto each storage, and with ``dcp.async_save`` every step onto each, each
save waiting for the previous one (what training pays in all: a qckpt save
returns once its chunks are stored raw and compacts them on a thread of the
writer's own, which shares the cores with training; the timed run waits for
its last compaction). In the checkpoint-every-step run, the writer's
compaction is waited for, untimed, after each qckpt save, so that it does not
run during the DCP save that follows.

Each rank freezes the objects it holds once its run is built (``gc.freeze``):
a rank process holds ~320k objects (torch, FSDP, DCP), and a full garbage
collection over them took ~150 ms here, landing in whichever save or restore
happened to trigger it (without the freeze: 4 of 20 saves of each method on
rank 0 in one run, and both restore attempts of several runs). Frozen objects
are never scanned again, as in a tuned training job; what each save allocates
is still collected, and paid for, as usual.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch

import qckpt
from bench.workload import SIZES, CharGPT, RandomBatchSampler, load_corpus
from qckpt.distributed import QckptReader, QckptWriter, load_sharded_state_dict, sharded_state_dict

WORLD = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the tiny model, 6 steps")
    parser.add_argument("--size", choices=sorted(SIZES), default="3m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")


class _Run:
    """One rank's training run: the sharded model, AdamW, its own batch sampler, as a
    ``TrainingState`` (what both methods checkpoint: ``sharded_state_dict``)."""

    def __init__(self, rank: int, size: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        self.model = CharGPT(SIZES[size], dropout=0.1)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        spec = SIZES[size]
        self.sampler = RandomBatchSampler(load_corpus(1 << 18), spec.block_size, spec.batch_size, seed=100 + rank)
        self.state = qckpt.TrainingState(model=self.model, optimizer=self.optimizer, sampler=self.sampler)
        gc.freeze()  # see the module docstring

    def step(self) -> float:
        x, y = self.sampler.next_batch()
        loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        return float(loss)


def _rank(rank: int, rendezvous: str, root: str, phase: str, size: str, steps: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    faulthandler.enable()  # a rank that crashes in native code says where
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # fmt: skip
    out: dict[str, Any] = {}
    repo_path = Path(root, "repo")
    try:
        run = _Run(rank, size)
        if phase == "train":
            writer = QckptWriter(repo_path, "main")
            times: dict[str, list[float]] = {"qckpt": [], "dcp": []}
            for step in range(1, steps + 1):
                run.step()
                order = ("qckpt", "dcp") if step % 2 else ("dcp", "qckpt")
                for method in order:
                    dist.barrier()
                    started = time.perf_counter()
                    if method == "qckpt":
                        writer.commit(run.state)
                    else:
                        dcp.save(sharded_state_dict(run.state), storage_writer=dcp.FileSystemWriter(Path(root, "dcp", f"step-{step}")))
                    times[method].append(time.perf_counter() - started)
                    writer.wait()  # untimed: the compaction must not slow the other method's save
            writer.close()
            torch.save(_local_parts(run), Path(root, f"parts-rank{rank}.pt"))
            out["commit_s"] = {m: sum(t) / len(t) for m, t in times.items()}
            out["restore_s"] = _restore_times(run, repo_path, Path(root, "dcp", f"step-{steps}"))
        elif phase == "walls":  # the same training five times: no checkpoints, dcp.save and async_save onto each
            out["walls_s"] = _walls(rank, Path(root), size, steps)
        else:  # resume: restore the middle step, train to the end, checkpoint on "resume"
            reader = QckptReader(repo_path, f"main@{steps // 2}")
            reader.restore(run.state)
            reader.close()
            while run.state.step < steps:
                run.step()
            writer = QckptWriter(repo_path, "resume")
            writer.commit(run.state)
            writer.close()
        dist.barrier()  # nobody tears the group down while a peer still talks (gloo aborts on a closed peer)
    finally:
        Path(root, f"{phase}-rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()
    leave_rank()


def leave_rank() -> NoReturn:
    """End a rank process whose work is done and written, and whose process group is
    destroyed, without interpreter finalization: gloo's teardown aborted there
    ("terminate called without an active exception") in two of many runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _local_parts(run: _Run) -> dict[str, dict[str, tuple[bool, Any]]]:
    """This rank's part of the model's and the optimizer's state, by parameter name,
    each value with whether it is a shard (a DTensor's local part: FSDP2 shards
    dim 0) or whole. No collectives: ``_full_state`` joins the ranks' parts."""
    from torch.distributed.tensor import DTensor, Shard

    def part(value: Any) -> tuple[bool, Any]:
        if isinstance(value, DTensor):
            return value.placements == (Shard(0),), value.to_local().clone()
        return False, value.clone() if isinstance(value, torch.Tensor) else value

    names = [name for name, _ in run.model.named_parameters()]  # one parameter group, in this order
    return {
        "model": {key: part(value) for key, value in run.model.state_dict().items()},
        "optimizer": {f"{names[i]}.{key}": part(value) for i, state in run.optimizer.state_dict()["state"].items()
                      for key, value in state.items()},
    }  # fmt: skip


def _full_state(root: Path) -> dict[str, dict[str, Any]]:
    """The unsharded state the ranks trained, from their ``_local_parts``."""
    parts = [torch.load(root / f"parts-rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {
        section: {key: torch.cat([p[section][key][1] for p in parts]) if sharded else value
                  for key, (sharded, value) in parts[0][section].items()}
        for section in parts[0]
    }  # fmt: skip


def _walls(rank: int, root: Path, size: str, steps: int) -> dict[str, float]:
    """Wall time of ``steps`` training steps (a fresh, identically seeded run each
    time) without checkpoints, with ``dcp.save`` every step onto each storage
    (``sync-``; qckpt's includes waiting for its last compaction), and with
    ``dcp.async_save`` every step onto each, each save waiting for the previous
    one first (DCP's usage)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    walls = {}
    group = dist.new_group(backend="gloo")  # async saves' collectives must not interleave with training's
    for method in ("none", "sync-qckpt", "sync-dcp", "qckpt", "dcp"):
        run = _Run(rank, size)
        writer = QckptWriter(root / "repo", method)
        pending = None
        dist.barrier()
        started = time.perf_counter()
        for step in range(1, steps + 1):
            run.step()
            if method == "none":
                continue
            target = root / f"dcp-{method}" / f"step-{step}"
            storage = writer if method.endswith("qckpt") else dcp.FileSystemWriter(target)
            if method.startswith("sync-"):
                dcp.save(sharded_state_dict(run.state), storage_writer=storage, process_group=group)
                continue
            if pending is not None:
                pending.result()
            pending = dcp.async_save(sharded_state_dict(run.state), storage_writer=storage, process_group=group)
        if pending is not None:
            pending.result()
        writer.wait()
        dist.barrier()
        walls[method] = time.perf_counter() - started
        writer.close()
    return walls


def _restore_times(run: _Run, repo_path: Path, dcp_dir: Path) -> dict[str, float]:
    """Best of two ``dcp.load`` of the last step into fresh state dicts, alternating."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    best = {"qckpt": float("inf"), "dcp": float("inf")}
    for attempt in range(2):
        for method in ("qckpt", "dcp") if attempt % 2 == 0 else ("dcp", "qckpt"):
            dist.barrier()
            started = time.perf_counter()
            if method == "qckpt":
                reader = QckptReader(repo_path, "main")
                reader.restore(run.state)
                reader.close()
            else:
                tree = sharded_state_dict(run.state)
                dcp.load(tree, storage_reader=dcp.FileSystemReader(dcp_dir))
                load_sharded_state_dict(run.state, tree)
            best[method] = min(best[method], time.perf_counter() - started)
    return best


def _spawn(root: Path, phase: str, size: str, steps: int) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    rendezvous = root / f"rendezvous-{phase}"
    procs = [context.Process(target=_rank, args=(r, str(rendezvous), str(root), phase, size, steps)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{phase}: rank exit codes {[p.exitcode for p in procs]}")
    return [json.loads(Path(root, f"{phase}-rank{r}.json").read_text()) for r in range(WORLD)]


def _same_snapshots(repo: qckpt.Repository, a: str, b: str) -> bool:
    first, second = repo.load(a), repo.load(b)
    return sorted(first) == sorted(second) and all(torch.equal(first[p], second[p]) for p in first)


def _resharded_equal(root: Path, size: str) -> bool:
    """The last snapshot loaded into one unsharded model and optimizer in this
    process (no process group) equals the full state the ranks trained."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = CharGPT(SIZES[size], dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    spec = SIZES[size]
    sampler = RandomBatchSampler(load_corpus(1 << 18), spec.block_size, spec.batch_size, seed=0)
    reader = QckptReader(root / "repo", "main")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reader.restore(qckpt.TrainingState(model=model, optimizer=optimizer, sampler=sampler))
    reader.close()
    full = _full_state(root)
    model_ok = model.state_dict().keys() == full["model"].keys() and all(
        torch.equal(v, full["model"][k]) for k, v in model.state_dict().items())  # fmt: skip
    loaded = {f"{p}.{k}": v for p, s in get_state_dict(model, optimizer)[1]["state"].items() for k, v in s.items()}
    optim_ok = loaded.keys() == full["optimizer"].keys() and all(
        torch.equal(torch.as_tensor(v), torch.as_tensor(full["optimizer"][k])) for k, v in loaded.items())  # fmt: skip
    return model_ok and optim_ok


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> dict[str, Any]:
    size, steps = ("tiny", 6) if args.quick else (args.size, args.steps)
    if steps < 2:
        raise SystemExit("--steps must be at least 2 (the resume check restores the middle step)")
    root = Path(tempfile.mkdtemp(prefix="qckpt-dist-"))
    try:
        qckpt.Repository.init(root / "repo").close()
        ranks = _spawn(root, "train", size, steps)
        _spawn(root, "resume", size, steps)
        walls = _spawn(root, "walls", size, steps)[0]["walls_s"]
        with qckpt.Repository.open(root / "repo") as repo:
            qckpt_bytes = repo.stats().stored_bytes
            bit_exact = _same_snapshots(repo, "main", "resume")
        results = {
            "model": size, "steps": steps, "ranks": WORLD,
            "qckpt_bytes": qckpt_bytes, "dcp_bytes": _tree_bytes(root / "dcp"),
            "qckpt_commit_s": ranks[0]["commit_s"]["qckpt"], "dcp_save_s": ranks[0]["commit_s"]["dcp"],
            "qckpt_restore_s": ranks[0]["restore_s"]["qckpt"], "dcp_load_s": ranks[0]["restore_s"]["dcp"],
            "bit_exact": bit_exact, "resharded_restore": _resharded_equal(root, size),
            "train_s": walls["none"], "qckpt_sync_train_s": walls["sync-qckpt"], "dcp_sync_train_s": walls["sync-dcp"],
            "qckpt_async_train_s": walls["qckpt"], "dcp_async_train_s": walls["dcp"],
        }  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["bytes_ratio"] = results["qckpt_bytes"] / results["dcp_bytes"]
    results["commit_ratio"] = results["qckpt_commit_s"] / results["dcp_save_s"]
    results["restore_ratio"] = results["qckpt_restore_s"] / results["dcp_load_s"]
    print(f"{WORLD} ranks, {size} model, {steps} steps, a checkpoint every step (FSDP2, gloo, CPU):")
    print(f"  stored bytes   qckpt {results['qckpt_bytes'] / 2**20:8.2f} MiB  dcp.save {results['dcp_bytes'] / 2**20:8.2f} MiB"
          f"  ({results['bytes_ratio']:.3f}x; target <= 0.45)")  # fmt: skip
    print(f"  commit / save  qckpt {results['qckpt_commit_s']:8.3f} s    dcp.save {results['dcp_save_s']:8.3f} s"
          f"    ({results['commit_ratio']:.2f}x; target <= 1.0)")  # fmt: skip
    print(f"  restore / load qckpt {results['qckpt_restore_s']:8.3f} s    dcp.load {results['dcp_load_s']:8.3f} s"
          f"    ({results['restore_ratio']:.2f}x; target <= 1.5)")  # fmt: skip
    print(f"  {steps} steps with dcp.save every step:       qckpt {results['qckpt_sync_train_s']:.2f} s, "
          f"dcp {results['dcp_sync_train_s']:.2f} s")
    print(f"  {steps} steps with dcp.async_save every step: qckpt {results['qckpt_async_train_s']:.2f} s, "
          f"dcp {results['dcp_async_train_s']:.2f} s, without checkpoints {results['train_s']:.2f} s")
    print(f"  bit-exact resume in new processes: {results['bit_exact']}; 2 ranks -> 1 process: {results['resharded_restore']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results
