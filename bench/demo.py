"""``python -m bench demo`` (``make demo``): the whole story in a few minutes on a CPU.

1. Train the reference model, committing every step's full training state.
2. In a fresh process, restore the snapshot from the middle of the run and train on.
3. Check the continuation is bit-identical (losses and every tensor of the final state).
4. Print a storage report: raw bytes versus stored bytes, dedup, and torch.save for scale.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import qckpt
from qckpt._progress import Progress
from bench.compare import differences
from bench.s3server import CREDENTIALS, moto_server, new_bucket
from bench.workload import SIZES, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", type=Path, default=Path("demo-repo"), help="where to create the demo repository")
    parser.add_argument("--size", choices=sorted(SIZES), default="3m")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--s3", action="store_true", help="use an S3 repository on a loopback S3 server (moto)")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _fresh_repository(path: Path) -> qckpt.Repository:
    if path.exists():
        try:
            qckpt.Repository.open(path).close()
        except qckpt.RepositoryNotFoundError:
            raise SystemExit(f"{path} exists and is not a qckpt repository; choose another --repo") from None
        shutil.rmtree(path)
    return qckpt.Repository.init(path)


def run(args: argparse.Namespace) -> None:
    if not args.s3:
        _run(args, str(args.repo), _fresh_repository(args.repo))
        return
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with moto_server() as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint  # the training subprocess finds the server too
        location = f"s3://{new_bucket(endpoint)}/demo"
        _run(args, location, qckpt.Repository.init(location))


def _run(args: argparse.Namespace, location: str, repo: qckpt.Repository) -> None:
    half = args.steps // 2
    trainer = Trainer(args.size, total_steps=args.steps)
    print(f"qckpt demo: {args.size} model ({trainer.num_params():,} parameters), {args.steps} steps, "
          f"a commit every step into {location}")  # fmt: skip

    stall_s = 0.0
    start = time.perf_counter()
    with Progress(args.steps, "training") as bar:
        for _ in range(args.steps):
            loss = trainer.train_step()
            t0 = time.perf_counter()
            repo.commit_async(trainer.state, metrics={"loss": loss})  # written in the background
            stall_s += time.perf_counter() - t0
            bar.update(1, loss=loss)
        repo.flush()
    wall_s = time.perf_counter() - start

    buffer = io.BytesIO()
    t0 = time.perf_counter()
    torch.save(trainer.state.capture(), buffer)
    torch_save_s = time.perf_counter() - t0
    repo.close()

    print(f"\nrestoring main@{half} in a fresh process and training {args.steps - half} more steps on branch 'resumed'...")
    subprocess.run(
        [sys.executable, "-m", "bench", "train", "--repo", location, "--size", args.size,
         "--total-steps", str(args.steps), "--restore", f"main@{half}", "--steps", str(args.steps - half),
         "--branch", "resumed"],
        check=True,
    )  # fmt: skip

    with qckpt.Repository.open(location) as repo:
        main_log = {s.step: s for s in repo.log("main")}
        resumed_log = {s.step: s for s in repo.log("resumed") if s.step is not None and s.step > half}
        same_losses = all(main_log[k].metrics["loss"] == s.metrics["loss"] for k, s in resumed_log.items())
        final_main, final_resumed = repo.load("main"), repo.load("resumed")
        differing = differences(final_main.tree(), final_resumed.tree())
        identical = same_losses and not differing and len(resumed_log) == args.steps - half
        first_resumed = min(resumed_log.values(), key=lambda s: s.step)
        forked = first_resumed.parents == (repo.resolve(f"main@{half}"),)
        print(f"branch 'resumed' forks from main@{half} (its lineage, not a new root): {forked}")
        print(f"losses of steps {half + 1}..{args.steps} identical: {same_losses}")
        print(f"final state: {len(final_main)} tensors and all plain values compared bitwise; differences: {differing or 'none'}")
        print("RESULT: continuation is bit-identical" if identical else "RESULT: MISMATCH")

        stats = repo.stats()
        resumed_added = sum(s.stats.new_stored_bytes for s in resumed_log.values())
        print("\nstorage report")
        print(f"  snapshots                    {stats.snapshots} (main: {len(main_log)}, resumed: {len(resumed_log)})")
        print(f"  raw training state, summed   {_mb(stats.raw_bytes)}")
        print(f"  distinct chunks (raw)        {_mb(stats.unique_raw_bytes)}   dedup {stats.dedup_ratio:.2f}x")
        print(f"  stored on disk               {_mb(stats.stored_bytes)}   overall {stats.compression_ratio:.2f}x smaller")
        print(f"  added by branch 'resumed'    {_mb(resumed_added)} (identical states deduplicate to nothing)")
        print(f"  one torch.save of the state  {_mb(buffer.tell())}; x{stats.snapshots} = {_mb(buffer.tell() * stats.snapshots)}")
        print(f"  training waited per commit   {stall_s / args.steps * 1e3:.0f} ms (torch.save to memory: {torch_save_s * 1e3:.0f} ms)")
        print(f"  training + all commits       {wall_s:.1f} s for {args.steps} steps")
    if not identical:
        raise SystemExit(1)
