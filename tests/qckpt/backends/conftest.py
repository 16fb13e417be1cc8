"""Every backend runs the same conformance suite: add a factory here to enrol one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qckpt.backends import Backend, LocalBackend, MemoryBackend

FACTORIES: dict[str, Callable[[Path], Backend]] = {
    "memory": lambda tmp: MemoryBackend("conformance"),
    "local": lambda tmp: LocalBackend(tmp / "store"),
}


@pytest.fixture(params=sorted(FACTORIES))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = FACTORIES[request.param](tmp_path)
    yield b
    b.close()
