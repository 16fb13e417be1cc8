"""``python -m bench.rollout_phases [--k 8] [--size 10m] [--device cuda] [--rounds 1]``:
where the wall time of K futures goes, per strategy.

Runs the rollout benchmark's measurement (``bench.rollout.measure``: same
origin, same futures, H=20) through the sequential and the batched executor,
and times every commit the futures make: the caller's ``commit_async`` (the
staging of the tensors into host memory, and any wait for room in the
writer's queue), its writing on the writer thread (encoding and writing,
overlapping the next future's work; of it, the pack writes, each fsync'd, are
timed too: they run on the store's pool while encoding goes on), and every
``restore`` the executors make,
synchronising the device around each, next to the training step alone
(``bench.rollout.training_only``), then one whole light-cone event per
strategy as a run meets it (``event``: the origin no longer hot, held-out
selection, the join and the restore that continues the run from it), and
to what the disk under the temporary
directory (where the benchmark's repository lives) writes and fsyncs per second,
and how long one small record takes to write durably there (``record_write_s``).
Prints one line per strategy and round, and returns the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import qckpt
from bench import rollout
from bench.spike import Workload, warm_cone
from bench.workload import SIZES
from branch import BatchedRollouts, BatchedStep, ConeConfig, SequentialRollouts, Trigger

HORIZON = 20
ORIGIN_COMMITS = 8  # an event's origin as deep in its delta chain as a long run's are on average (max_chain 16)


def measure(k: int, size: str, device: str, rounds: int = 1) -> dict[str, Any]:
    workload = Workload(1000, size=SIZES[size], device=device)
    step = BatchedStep(clip_grad_norm=1.0)
    sync = torch.cuda.synchronize if workload.device.type == "cuda" else (lambda: None)
    sequential, batched = rollout.training_only(workload, k, step)
    print(f"K={k} {size}: training alone {sequential:.1f} vs {batched:.1f} future-steps/s", flush=True)
    disk, record = disk_write_mb_s(), record_write_s()
    print(f"disk under {tempfile.gettempdir()}: {disk:.0f} MB/s written and fsync'd (64 MiB files); a 4 KiB record "
          f"written durably (file and directory fsync'd, as a commit writes 4-5) in {record * 1e3:.1f} ms", flush=True)
    out: dict[str, Any] = {"train_steps_per_s": {"sequential": sequential, "batched": batched}, "disk_write_mb_s": disk,
                           "record_write_s": record, "rounds": []}  # fmt: skip
    for _ in range(rounds):
        for name, executor in (("sequential", SequentialRollouts()), ("batched", BatchedRollouts(step))):
            spent: dict[str, list[float]] = {"commit_async": [], "write": [], "restore": [], "pack_write": []}

            def instrument(repo: qckpt.Repository, spent: dict[str, list[float]] = spent) -> None:
                for op in ("commit_async", "restore"):
                    setattr(repo, op, _timed(getattr(repo, op), spent[op], sync))
                # below the public API: the writer thread's half of each commit, and the pack writes in it
                repo._write_commit = _timed(repo._write_commit, spent["write"], lambda: None)  # type: ignore[method-assign]
                repo._store.put_pack = _timed(repo._store.put_pack, spent["pack_write"], lambda: None)  # type: ignore[method-assign]

            wall = k * HORIZON / rollout.measure(workload, k, HORIZON, executor, size, instrument)[0]
            figures = {"strategy": name, "wall_s": wall, **{f"{op}_s": sum(t) for op, t in spent.items()},
                       **{f"{op}_median_s": statistics.median(t) if t else None for op, t in spent.items()}}  # fmt: skip
            out["rounds"].append(figures)
            print(f"{name} K={k} H={HORIZON} {size}: wall {wall:.2f} s; {len(spent['write'])} commits written in "
                  f"{figures['write_s']:.2f} s (median {figures['write_median_s'] * 1e3:.0f} ms; {len(spent['pack_write'])} "
                  f"pack writes {figures['pack_write_s']:.2f} s), the caller in commit_async {figures['commit_async_s']:.2f} s "
                  f"(median {figures['commit_async_median_s'] * 1e3:.0f} ms); {len(spent['restore'])} restores "
                  f"{figures['restore_s']:.2f} s", flush=True)  # fmt: skip
    out["events"] = {}
    for name, executor in (("sequential", SequentialRollouts()), ("batched", BatchedRollouts(step))):
        figures = out["events"][name] = event(workload, k, executor, sync)
        print(f"{name} event K={k} H={HORIZON} {size}: {figures['event_s']:.2f} s; the origin restored from storage in "
              f"{figures['origin_restore_s']:.2f} s, the futures {figures['run_futures_s']:.2f} s (that restore "
              f"included), the join {figures['join_s'] * 1e3:.0f} ms, continuing from it {figures['continue_s']:.2f} s",
              flush=True)  # fmt: skip
    return out


def event(workload: Workload, k: int, executor: Any, sync: Any) -> dict[str, float]:
    """One light-cone event as a run meets it, timed: commits every ``HORIZON // 2``
    steps, ``ORIGIN_COMMITS`` of them up to the origin; the trigger fires two
    commits after it, when it has left the hot tier (two snapshots by default); K futures (``bench.rollout.futures``)
    run to ``HORIZON`` with ``executor``, are scored on two held-out batches, and
    the run's branch joins the chosen one and continues from it. Times (seconds):
    the whole ``explore``, the origin's restore from storage (the executor's first
    restore), ``run_futures`` (that restore included), the join, and the restore
    of the join."""
    every = HORIZON // 2
    spent: dict[str, list[float]] = {"restore": [], "run_futures": [], "join": []}
    with tempfile.TemporaryDirectory(prefix="qckpt-event-") as tmp, qckpt.Repository.init(Path(tmp) / "r") as repo:
        config = ConeConfig(horizon=HORIZON, commit_every=every, rollback=2 * every)
        cone = warm_cone(repo, workload, config, executor=executor, validation=2, warm=(ORIGIN_COMMITS - 1) * every)
        alternatives = [f.intervention for f in rollout.futures(k)[1:] if f.intervention is not None]
        cone.interventions = lambda situation: alternatives
        for _ in range(2 * every):  # two more commits: the origin is the third newest
            cone.observe(cone.train_step(next(cone.batches)))
        for obj, op in ((repo, "restore"), (repo, "join"), (cone, "run_futures")):
            setattr(obj, op, _timed(getattr(obj, op), spent[op], sync))
        started = time.perf_counter()
        cone.explore(Trigger(cone.state.step, 1.0, 1.0, cone.state.step, ()))
        sync()
        wall = time.perf_counter() - started
    return {"event_s": wall, "origin_restore_s": spent["restore"][0], "run_futures_s": spent["run_futures"][0],
            "join_s": spent["join"][0], "continue_s": spent["restore"][-1]}  # fmt: skip


def disk_write_mb_s(rounds: int = 3, size: int = 64 << 20) -> float:
    """The best of ``rounds`` writes of ``size`` bytes to a new file in the temporary
    directory, each followed by an fsync (as the store writes a pack), in MB/s."""
    data = os.urandom(size)
    best = float("inf")
    with tempfile.TemporaryDirectory(prefix="qckpt-disk-") as tmp:
        for i in range(rounds):
            started = time.perf_counter()
            _write_fsynced(os.path.join(tmp, str(i)), data)
            best = min(best, time.perf_counter() - started)
    return size / best / 1e6


def record_write_s(rounds: int = 11) -> float:
    """The median time to write a 4 KiB file durably as the store writes a record
    (manifest, snapshot, ref log entry, ref): a temporary file, fsync'd, renamed
    into place, and the directory fsync'd."""
    data = os.urandom(4096)
    times = []
    with tempfile.TemporaryDirectory(prefix="qckpt-disk-") as tmp:
        for i in range(rounds):
            started = time.perf_counter()
            temporary = os.path.join(tmp, f"{i}.tmp")
            _write_fsynced(temporary, data)
            os.replace(temporary, os.path.join(tmp, str(i)))
            directory = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def _write_fsynced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _timed(call: Any, into: list[float], sync: Any) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        sync()
        started = time.perf_counter()
        result = call(*args, **kwargs)
        sync()
        into.append(time.perf_counter() - started)
        return result

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--size", choices=sorted(SIZES), default="10m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this machine has no CUDA device")
    measure(args.k, args.size, args.device, args.rounds)


if __name__ == "__main__":
    main()
