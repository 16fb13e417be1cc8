"""Local-directory specifics: a child made by fork (DataLoader workers are) does not
keep the parent's flocks alive; large files are reserved before they are written."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from qckpt.backends import LocalBackend


def test_a_forked_child_does_not_keep_the_parents_locks(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    with backend.lock(exclusive=False):  # a commit holds the writer lock shared...
        child = os.fork()  # ...while a DataLoader forks a worker, which lives on
        if child == 0:
            time.sleep(4)
            os._exit(0)
    try:
        acquired = threading.Event()

        def collect() -> None:
            with backend.lock(exclusive=True):  # garbage collection, once the commit released it
                acquired.set()

        started = time.monotonic()
        threading.Thread(target=collect, daemon=True).start()
        assert acquired.wait(3), "the forked child kept the shared lock alive"
        assert time.monotonic() - started < 3
    finally:
        os.waitpid(child, 0)


def test_large_writes_reserve_exactly_their_size(tmp_path: Path) -> None:
    """Files of 1 MiB and more get their space reserved before writing: the file
    holds exactly what was written, whether one buffer or several."""
    backend = LocalBackend(tmp_path)
    parts = [np.full(3 << 20, 7, np.uint8), b"tail", memoryview(bytearray(range(256)) * 4096)]
    backend.put_cache("warm/big", parts)
    backend.put("packs/big.pack", parts[0])
    expected = b"".join(bytes(memoryview(p)) for p in parts)
    assert (tmp_path / "warm" / "big").stat().st_size == len(expected)
    assert backend.get("warm/big") == expected
    assert backend.get("packs/big.pack") == bytes(parts[0])
