"""Local-directory specifics: a child made by fork (DataLoader workers are) does not
keep the parent's flocks alive."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

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
