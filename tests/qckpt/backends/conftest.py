"""Every backend runs the same conformance suite: add a factory here to enrol one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qckpt.backends import Backend, LocalBackend, MemoryBackend, RetryingBackend, S3Backend
from bench.s3server import new_bucket

FACTORIES: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "memory": lambda request, tmp: MemoryBackend("conformance"),
    "local": lambda request, tmp: LocalBackend(tmp / "store"),
    "s3": lambda request, tmp: RetryingBackend(
        S3Backend(new_bucket(request.getfixturevalue("s3_endpoint")), "conformance/prefix")
    ),
}


@pytest.fixture(params=sorted(FACTORIES))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = FACTORIES[request.param](request, tmp_path)
    yield b
    b.close()
