"""``qckpt cone``: the light-cone runs recorded in a repository (a ``qckpt.cli`` plugin).

``qckpt cone list`` names the recorded runs with their events; ``qckpt cone
report [RUN] [-o PATH]`` writes ``PATH.html`` and ``PATH.png`` (default
``cone-RUN``) from the repository alone.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import qckpt
from branch.record import ConeRecord
from branch.report import write_report


def register(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("cone", cmd_cone, "light-cone runs recorded in the repository: list them or write a report")
    p.add_argument("action", choices=("list", "report"))
    p.add_argument("run", nargs="?", help="the run (default: the only one recorded)")
    p.add_argument("-o", "--output", help="report path without suffix (default: cone-RUN)")


def cmd_cone(args: argparse.Namespace, repo: qckpt.Repository) -> int:
    runs = ConeRecord.runs(repo)
    if args.action == "list":
        for run in runs:
            record = ConeRecord.load(repo, run)
            chosen = ", ".join(e["selection"]["chosen"] for e in record.events) or "no events"
            steps = record.main[-1][0] if record.main else 0
            print(f"{run:24s} {steps:7d} steps  {len(record.events)} events: {chosen}")
        if not runs:
            print("no light-cone runs recorded in this repository")
        return 0
    run: Any = args.run
    if run is None:
        if not runs:
            raise qckpt.RevisionNotFoundError("no light-cone runs recorded in this repository: nothing to report on")
        if len(runs) > 1:
            raise qckpt.InvalidInputError(f"name the run to report on, one of: {', '.join(runs)}")
        run = runs[0]
    html_path, png_path = write_report(repo, run, args.output or f"cone-{run}")
    print(f"wrote {html_path} and {png_path}")
    return 0
