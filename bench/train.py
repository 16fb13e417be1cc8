"""``python -m bench train``: run the reference workload, committing to a repository.

Used by the demo and by the bit-exact resume tests to train in fresh processes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import qckpt
from qckpt._progress import Progress
from bench.workload import SIZES, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", help="repository path, file:// or s3:// URI (created if --init)")
    parser.add_argument("--init", action="store_true", help="create the repository first")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps to run")
    parser.add_argument("--total-steps", type=int, default=200, help="length of the LR schedule")
    parser.add_argument("--restore", metavar="REV", help="restore this revision before training")
    parser.add_argument("--forget-rng", action="store_true",
                        help="after --restore, reseed the process RNGs (a control: the resumed run must then diverge)")
    parser.add_argument("--branch", default="main")
    parser.add_argument("--commit-every", type=int, default=1, help="0: never commit")
    parser.add_argument("--losses-out", type=Path, help="write {step: loss} JSON here")
    parser.add_argument("--final-out", type=Path, help="torch.save the final captured state here")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> dict[int, float]:
    trainer = Trainer(args.size, seed=args.seed, total_steps=args.total_steps)
    repo = None
    if args.repo is not None:
        repo = qckpt.Repository.init(args.repo) if args.init else qckpt.Repository.open(args.repo)
    losses: dict[int, float] = {}
    try:
        if args.restore:
            if repo is None:
                raise SystemExit("--restore needs --repo")
            repo.restore(trainer.state, args.restore)
            if args.forget_rng:
                torch.manual_seed(args.seed + 1)
        with Progress(args.steps, f"train {args.size}", enabled=not args.quiet) as bar:
            for _ in range(args.steps):
                loss = trainer.train_step()
                losses[trainer.state.step] = loss
                if repo is not None and args.commit_every and trainer.state.step % args.commit_every == 0:
                    repo.commit(trainer.state, branch=args.branch, metrics={"loss": loss})
                bar.update(1, loss=loss)
    finally:
        if repo is not None:
            repo.close()
    if args.losses_out:
        args.losses_out.write_text(json.dumps(losses))
    if args.final_out:
        torch.save(trainer.state.capture(), args.final_out)
    return losses

