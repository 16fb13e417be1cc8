"""Drop-in qckpt for training frameworks. Each module imports its framework, which
is an optional extra: ``qckpt.integrations.transformers`` needs ``qckpt[hf]``,
``qckpt.integrations.lightning`` needs ``qckpt[lightning]``."""

from __future__ import annotations

import os
from typing import Any

import torch

from qckpt.errors import RepositoryNotFoundError, StateMismatchError
from qckpt.format.records import Snapshot
from qckpt.repository import Repository
from qckpt.state import module_problems


def open_or_init(location: Repository | str | os.PathLike[str]) -> Repository:
    """``location`` itself if it is an open repository; else the repository there,
    created if there is none."""
    if isinstance(location, Repository):
        return location
    try:
        return Repository.open(location)
    except RepositoryNotFoundError:
        return Repository.init(location)


def check_module(
    repo: Repository, snapshot: Snapshot, path: tuple[str, ...], module: torch.nn.Module, what: str, name: str
) -> None:
    """``StateMismatchError`` (every offending key listed, as ``name/key``) unless the
    subtree at ``path`` of ``snapshot`` holds a state dict that fits ``module``
    (names, shapes, dtypes). Reads the manifest only, no tensor."""
    manifest = repo.manifest(snapshot)
    stored: Any = manifest.structure
    for key in path:
        stored = stored.get(key) if isinstance(stored, dict) else None
    problems = module_problems(name, module.state_dict(), stored)
    if problems:
        raise StateMismatchError(f"snapshot {snapshot.short_id} does not fit the {what}; nothing was loaded:", problems)
