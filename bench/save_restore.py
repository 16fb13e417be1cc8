"""``python -m bench save_restore``: how long training waits for checkpoints, and restore speed.

For each reference model size (``10m`` and ``100m``; ``--quick``: ``tiny`` and
``3m``), in one process:

* side by side, in turns after the same training steps (``ROUNDS`` rounds of: a
  training step, then ``clone_s``: copying the captured state in memory
  (``tensor.clone()``); a training step, then ``stall_s``: the time the
  training thread spends in ``Repository.commit_async`` (capture + staging
  into host memory); the commit written (untimed), then ``restore_hot_s``:
  ``Repository.restore`` of it, from the hot tier), medians: the three meet
  the same caches and the same idle writer;
* ``torch_save_s``: ``torch.save`` of the state to a local file;
* ``train_steps_per_s_no_ckpt``, ``..._ckpt_every_step``, ``..._ckpt_every_10``:
  training throughput with asynchronous commits (the final flush included);
  ``stall_every_step_s``: the mean stall in the every-step run, where the
  writer is still encoding the previous commit (the side-by-side commits
  follow these runs, on top of their history);
* in a fresh process (``bench.fresh``: a new Python process that builds the
  training state, trains one step untimed, then alternates the methods, best
  of 3): ``restore_latest_s``, ``restore_middle_s``, ``restore_oldest_s``:
  ``Repository.restore`` from storage into the live model and optimizer (the
  latest from its warm copy, older ones from their delta chains);
  ``torch_load_s``: ``torch.load`` of the latest state (there, not in the
  writing process); ``torch_resume_s``: the same plus loading it into the
  same live objects; ``first_step_after_restore_s`` /
  ``first_step_after_torch_resume_s``: the training step that follows each
  (it pays for copy-on-write pages a mapped restore left to it);
* ``full_restore_s`` / ``lazy_one_tensor_s``: ``load(latest).tree()`` versus
  reading one tensor (the largest weight) of it, from storage;
* ``warm_bytes_per_commit`` / ``history_bytes_per_commit``: what each commit
  wrote to the warm tier and to the history, next to ``state_bytes``.

Other times are the best of a few repetitions. On a CPU-only machine the
background writer competes with training for the same cores; that cost is
part of the throughput figures. The objects that exist once the model is
built are frozen (``gc.freeze``, as tuned training jobs do): the process holds
~310k of them, and a full garbage collection over them (~150 ms here, about
once in 40 commits) would land in whichever call triggered it, e.g. one
``commit_async`` (the mean stall of 40 went 15.2 -> 19.1 ms with one).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import qckpt
from bench.fresh import in_fresh_process
from bench.timing import Timings, best_time
from bench.workload import Trainer, train_step

ROUNDS = 7  # side-by-side rounds of clone, stall and hot restore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny and 3M models, few steps (about a minute)")
    parser.add_argument("--sizes", default=None, help="comma-separated model sizes (default 10m,100m; tiny,3m with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per throughput measurement (default 20; 10 with --quick)")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


def _throughput(
    trainer: Trainer, repo: qckpt.Repository | None, steps: int, every: int, stalls: list[float], ids: list[str]
) -> float:
    start = time.perf_counter()
    handles = []
    for step in range(1, steps + 1):
        train_step(trainer.state)
        if repo is not None and step % every == 0:
            before = time.perf_counter()
            handles.append(repo.commit_async(trainer.state))
            stalls.append(time.perf_counter() - before)
    if repo is not None:
        repo.flush()
    elapsed = time.perf_counter() - start
    ids += [h.wait().id for h in handles]
    return steps / elapsed


@dataclass
class _Restart:
    """Restarts timed in a fresh process: the training state is built there (its
    initial values are then replaced by every restore)."""

    size: str
    location: str
    ids: list[str]
    torch_path: str

    def times(self, positions: dict[str, int], repeats: int = 3) -> dict[str, float]:
        return in_fresh_process(self._times, positions, repeats)

    def _times(self, positions: dict[str, int], repeats: int) -> dict[str, float]:
        state = Trainer(self.size, total_steps=1000).state
        train_step(state)  # first-step costs (allocator, autograd) are nobody's restore cost
        timings = Timings()
        timed = timings.timed
        for _ in range(repeats):  # alternating, so drift on a shared machine hits every method alike
            for name, index in positions.items():
                with qckpt.Repository.open(self.location, hot_snapshots=0) as repo:
                    timed(f"restore_{name}_s", partial(repo.restore, state, self.ids[index]))
                    if name == "latest":
                        timed("first_step_after_restore_s", lambda: train_step(state))
            timed("torch_load_s", lambda: torch.load(self.torch_path, weights_only=False))
            timed("torch_resume_s", lambda: state.load(torch.load(self.torch_path, weights_only=False)))
            timed("first_step_after_torch_resume_s", lambda: train_step(state))
        return timings.best()


def _side_by_side(trainer: Trainer, repo: qckpt.Repository, ids: list[str]) -> dict[str, float]:
    """Medians over ``ROUNDS`` of a clone, a ``commit_async`` stall and a hot restore
    of that commit, each after a training step (see the module docstring); the
    commits are appended to ``ids``."""
    timings = Timings()
    timed = timings.timed
    for _ in range(ROUNDS):
        train_step(trainer.state)
        timed("clone_s", partial(_clone, trainer.state.capture()))
        train_step(trainer.state)
        handle = timed("stall_s", lambda: repo.commit_async(trainer.state))
        ids.append(handle.wait().id)
        timed("restore_hot_s", partial(repo.restore, trainer.state, ids[-1]))
    return timings.medians()


def measure(size: str, steps: int, root: Path) -> dict[str, float]:
    trainer = Trainer(size, total_steps=10 * steps)
    for _ in range(2):
        train_step(trainer.state)
    gc.freeze()  # see the module docstring
    tree = trainer.state.capture()
    out: dict[str, float] = {"params": sum(p.numel() for p in trainer.model.parameters())}
    path = root / f"{size}.pt"
    out["torch_save_s"] = best_time(lambda: torch.save(tree, path))
    out["state_bytes"] = path.stat().st_size

    location = root / f"{size}-repo"
    repo = qckpt.Repository.init(location)
    stalls: list[float] = []
    ids: list[str] = []
    out["train_steps_per_s_no_ckpt"] = _throughput(trainer, None, steps, 1, [], [])
    out["train_steps_per_s_ckpt_every_step"] = _throughput(trainer, repo, steps, 1, stalls, ids)
    out["stall_every_step_s"] = statistics.mean(stalls)
    out["train_steps_per_s_ckpt_every_10"] = _throughput(trainer, repo, 2 * steps, 10, [], ids)
    history = [repo.snapshot(i) for i in ids]
    out["history_bytes_per_commit"] = statistics.mean(s.stats.new_stored_bytes for s in history)
    warm = repo._warm  # the writer's own count (internal: no public API needs it)
    out["warm_bytes_per_commit"] = (warm.bytes_written if warm is not None else 0) / len(ids)
    out.update(_side_by_side(trainer, repo, ids))  # after the per-commit figures: these commits are two steps apart
    latest = ids[-1]
    torch.save(trainer.state.capture(), path)  # the same state as the latest snapshot, for torch's resume
    repo.close()
    out.update(_Restart(size, str(location), ids, str(path)).times({"latest": len(ids) - 1, "middle": steps // 2, "oldest": 0}))

    with qckpt.Repository.open(location, hot_snapshots=0) as fresh:
        view = fresh.load(latest)
        largest = max(view, key=lambda p: view.entry(p).nbytes)
        out["full_restore_s"] = best_time(lambda: fresh.load(latest).tree())
        out["lazy_one_tensor_s"] = best_time(lambda: fresh.load(latest)[largest])
        out["latest_chain_depth"] = max(
            fresh._store.index.get(c).depth for e in fresh.manifest(fresh.snapshot(latest)).tensors for c in e.chunks  # type: ignore[union-attr]
        )
    return out


def _ratios(m: dict[str, float]) -> dict[str, float]:
    return {
        "stall/clone": m["stall_s"] / m["clone_s"],
        "stall/torch_save": m["stall_s"] / m["torch_save_s"],
        "every_10/no_ckpt": m["train_steps_per_s_ckpt_every_10"] / m["train_steps_per_s_no_ckpt"],
        "every_step/no_ckpt": m["train_steps_per_s_ckpt_every_step"] / m["train_steps_per_s_no_ckpt"],
        "restore_latest/torch_load": m["restore_latest_s"] / m["torch_load_s"],
        "restore_latest/torch_resume": m["restore_latest_s"] / m["torch_resume_s"],
        "restore_middle/torch_load": m["restore_middle_s"] / m["torch_load_s"],
        "restore_oldest/torch_load": m["restore_oldest_s"] / m["torch_load_s"],
        "restore_latest+step/torch_resume+step": (m["restore_latest_s"] + m["first_step_after_restore_s"])
        / (m["torch_resume_s"] + m["first_step_after_torch_resume_s"]),
        "warm_bytes_per_commit/state": m["warm_bytes_per_commit"] / m["state_bytes"],
        "history_bytes_per_commit/state": m["history_bytes_per_commit"] / m["state_bytes"],
        "restore_hot/clone": m["restore_hot_s"] / m["clone_s"],
        "lazy_one_tensor/full_restore": m["lazy_one_tensor_s"] / m["full_restore_s"],
    }


def run(args: argparse.Namespace) -> None:
    sizes = (args.sizes or ("tiny,3m" if args.quick else "10m,100m")).split(",")
    steps = args.steps or (10 if args.quick else 20)
    results: dict[str, Any] = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="qckpt-bench-save-restore-") as tmp:
        for size in sizes:
            measured = measure(size, steps, Path(tmp))
            results["sizes"][size] = {**measured, "ratios": _ratios(measured)}
            print(f"\n{size} ({int(measured['params']):,} params, state {measured['state_bytes'] / 1e6:.0f} MB)")
            for key, value in measured.items():
                if key.endswith("_s"):
                    print(f"  {key:36s} {value * 1e3:10.1f} ms")
                elif key.startswith("train_steps"):
                    print(f"  {key:36s} {value:10.2f}")
            print(f"  latest snapshot's chain depth        {int(measured['latest_chain_depth']):10d}")
            for key, value in results["sizes"][size]["ratios"].items():
                print(f"  {key:36s} {value:10.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}")
