"""Shared fixtures: repositories on each backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import qckpt


@pytest.fixture(params=["memory", "local"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[qckpt.Repository]:
    """An empty repository with small chunks (so tensors span several chunks)."""
    location = qckpt.MemoryBackend() if request.param == "memory" else tmp_path / "repo"
    with qckpt.Repository.init(location, chunk_size=256) as r:
        yield r


@pytest.fixture
def local_repo_path(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    qckpt.Repository.init(path, chunk_size=256).close()
    return path
