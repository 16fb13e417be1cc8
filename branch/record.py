"""The light-cone record: every event of a run, stored in the repository itself.

A run's record is plain data committed as the tree of a snapshot on branch
``<run>.cone`` (``Repository.commit`` of a dict: no tensors), rewritten after
each event, so another process can read it later from the repository alone,
locally or on S3 (``ConeRecord.load``). Layout (``version`` 1)::

    {"version": 1, "run": str, "branch": str, "config": {...},
     "main": [[step, loss, grad_norm | None], ...],          # the run as it went on
     "events": [{"trigger": {...}, "origin": {"snapshot", "step"},
                 "futures": [{"name", "branch", "intervention", "control",
                              "metrics": [[step, loss, grad_norm], ...],
                              "eval": [loss per held-out batch], "eval_mean",
                              "snapshot", "diverged"}],
                 "selection": {"chosen", "control", "comparisons": [...]},
                 "join": snapshot id, "forecasts": {...}}, ...],
     "compute": {"train_steps", "eval_batches"}}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import qckpt

RECORD_VERSION = 1


def record_branch(run: str) -> str:
    return f"{run}.cone"


@dataclass
class ConeRecord:
    """Everything a light-cone run did (see the module docstring for the layout)."""

    run: str
    branch: str
    config: dict[str, Any] = field(default_factory=dict)
    main: list[list[Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    compute: dict[str, int] = field(default_factory=lambda: {"train_steps": 0, "eval_batches": 0})

    def as_tree(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, "run": self.run, "branch": self.branch, "config": self.config,
                "main": self.main, "events": self.events, "compute": self.compute}  # fmt: skip

    def save(self, repo: qckpt.Repository, message: str) -> qckpt.Snapshot:
        return repo.commit(self.as_tree(), branch=record_branch(self.run), message=message)

    @classmethod
    def load(cls, repo: qckpt.Repository, run: str) -> ConeRecord:
        """The record of ``run`` (``RevisionNotFoundError`` if none was saved)."""
        branch = record_branch(run)
        if branch not in repo.branches():
            known = sorted(b.removesuffix(".cone") for b in repo.branches() if b.endswith(".cone"))
            raise qckpt.RevisionNotFoundError(f"no light-cone record for run {run!r} (recorded runs: {known or 'none'})")
        tree = repo.load(branch).tree()
        if not isinstance(tree, dict) or tree.get("version") != RECORD_VERSION:
            raise qckpt.IntegrityError(f"branch {branch} does not hold a light-cone record of version {RECORD_VERSION}")
        return cls(tree["run"], tree["branch"], tree["config"], tree["main"], tree["events"], tree["compute"])

    @staticmethod
    def runs(repo: qckpt.Repository) -> list[str]:
        """Runs with a record in ``repo``."""
        return sorted(b.removesuffix(".cone") for b in repo.branches() if b.endswith(".cone"))
