"""``python -m bench fork``: fork latency and bytes written, and space returned by GC.

For a small and a large reference model (3M and 100M parameters; ``--quick``:
tiny and 3M) with a populated AdamW state committed once:

* ``fork_s_small`` / ``fork_s_large``: median time of ``create_branch`` at the
  latest snapshot (what ``qckpt fork`` does);
* ``fork_bytes_written``: object bytes (packs, manifests, snapshots) written by
  all forks together; a fork writes only a ref and its ref log record (a few
  hundred bytes of metadata);
* ``copy_checkpoint_s_large``: the usual alternative, copying a ``torch.save``
  file of the same state, side by side in the same run;
* ``gc_size_ratio``: repository size after fork + 3 committed training steps on
  the branch + branch deletion + gc, divided by the size before the fork. A
  deleted branch stays protected for the ref log's grace period (7 days by
  default, so a mistake can be undone); this collects with a grace period of
  0, as ``qckpt gc --reflog-grace 0`` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qckpt
from bench.workload import Trainer

FORKS = 21


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny and 3m models instead of 3m and 100m")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _object_bytes(repo: qckpt.Repository) -> int:
    return repo.stats().stored_bytes


def _measure(size: str, workdir: Path) -> dict[str, float]:
    trainer = Trainer(size, total_steps=100)
    trainer.train_step()  # populate the optimizer state
    repo = qckpt.Repository.init(workdir / f"repo-{size}")
    repo.commit(trainer.state, metrics={"loss": 0.0})
    before = _object_bytes(repo)
    times = []
    for i in range(FORKS):
        t0 = time.perf_counter()
        repo.create_branch(f"fork-{i}", "main")
        times.append(time.perf_counter() - t0)
    written = _object_bytes(repo) - before

    checkpoint = workdir / f"{size}.pt"
    torch.save(trainer.state.capture(), checkpoint)
    copies = []
    for i in range(3):
        t0 = time.perf_counter()
        shutil.copyfile(checkpoint, workdir / f"{size}-copy{i}.pt")
        copies.append(time.perf_counter() - t0)

    for i in range(FORKS):
        repo.delete_branch(f"fork-{i}")
    repo.create_branch("experiment", "main")
    for _ in range(3):
        loss = trainer.train_step()
        repo.commit(trainer.state, branch="experiment", metrics={"loss": loss})
    repo.delete_branch("experiment")
    repo.gc(qckpt.RetentionPolicy(reflog_grace=0))
    after = _object_bytes(repo)
    repo.close()
    return {
        "params": trainer.num_params(),
        "fork_s": statistics.median(times),
        "fork_bytes_written": written,
        "copy_checkpoint_s": statistics.median(copies),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "gc_size_ratio": after / before,
    }


def run(args: argparse.Namespace) -> dict[str, float]:
    small_size, large_size = ("tiny", "3m") if args.quick else ("3m", "100m")
    with tempfile.TemporaryDirectory(prefix="qckpt-bench-fork-") as tmp:
        small = _measure(small_size, Path(tmp))
        large = _measure(large_size, Path(tmp))
    results = {
        "models": {"small": small_size, "large": large_size},
        "params_small": small["params"],
        "params_large": large["params"],
        "fork_s_small": small["fork_s"],
        "fork_s_large": large["fork_s"],
        "fork_large_over_small": large["fork_s"] / small["fork_s"],
        "fork_bytes_written": small["fork_bytes_written"] + large["fork_bytes_written"],
        "copy_checkpoint_s_large": large["copy_checkpoint_s"],
        "fork_over_copy_large": large["fork_s"] / large["copy_checkpoint_s"],
        "checkpoint_bytes_large": large["checkpoint_bytes"],
        "gc_size_ratio": small["gc_size_ratio"],
        "gc_size_ratio_large": large["gc_size_ratio"],
    }
    print(f"{'':28s}{small_size:>14s}{large_size:>14s}")
    print(f"{'parameters':28s}{small['params']:>14,}{large['params']:>14,}")
    print(f"{'fork (median of 21)':28s}{small['fork_s'] * 1e3:>12.3f}ms{large['fork_s'] * 1e3:>12.3f}ms")
    print(f"{'copy torch.save checkpoint':28s}{small['copy_checkpoint_s'] * 1e3:>12.1f}ms"
          f"{large['copy_checkpoint_s'] * 1e3:>12.1f}ms")  # fmt: skip
    print(f"{'object bytes written':28s}{small['fork_bytes_written']:>14d}{large['fork_bytes_written']:>14d}")
    print(f"{'size after branch+gc':28s}{small['gc_size_ratio']:>13.4f}x{large['gc_size_ratio']:>13.4f}x")
    print(f"\nfork_s_large / fork_s_small = {results['fork_large_over_small']:.2f} (target <= 1.5); "
          f"fork / copy (large) = {results['fork_over_copy_large']:.5f}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results
