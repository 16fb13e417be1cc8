"""Shared fixtures: repositories on each backend, and a real S3 server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import qckpt
from bench.s3server import CREDENTIALS, moto_server, new_bucket
from qckpt.backends import S3Backend


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Dummy AWS credentials and a private index cache, for this process and its children."""
    saved = dict(os.environ)
    os.environ.update(CREDENTIALS)
    os.environ["QCKPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("qckpt-cache"))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session; also exported as AWS_ENDPOINT_URL.
    S3 writer-lock leases in this process are shortened (every S3 garbage collection
    waits out a lease, see ``qckpt.backends._reflock``); child processes keep the defaults."""
    saved = S3Backend.lock_refresh_s, S3Backend.lock_stale_s
    S3Backend.lock_refresh_s, S3Backend.lock_stale_s = 0.5, 4.0  # leases of 3 s, robust on a busy machine
    with moto_server() as url:
        os.environ["AWS_ENDPOINT_URL"] = url
        yield url
    S3Backend.lock_refresh_s, S3Backend.lock_stale_s = saved


@pytest.fixture
def s3_uri(s3_endpoint: str) -> str:
    """A fresh bucket, as an s3:// repository location with a prefix."""
    return f"s3://{new_bucket(s3_endpoint)}/runs/exp1"


@pytest.fixture(params=["memory", "local", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[qckpt.Repository]:
    """An empty repository with small chunks (so tensors span several chunks), on each backend."""
    if request.param == "s3":
        location: object = request.getfixturevalue("s3_uri")
    else:
        location = qckpt.MemoryBackend() if request.param == "memory" else tmp_path / "repo"
    with qckpt.Repository.init(location, chunk_size=256) as r:  # type: ignore[arg-type]
        yield r


@pytest.fixture
def local_repo_path(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    qckpt.Repository.init(path, chunk_size=256).close()
    return path
