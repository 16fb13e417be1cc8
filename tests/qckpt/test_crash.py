"""A commit interrupted at any point leaves the repository readable with its refs intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import qckpt

# The child commits snapshot 1 cleanly, then dies (os._exit, no cleanup) just
# before the Nth write of snapshot 2's commit: pack, manifest, snapshot, ref log, ref,
# then (after the commit is durable) its warm copy.
CHILD = textwrap.dedent(
    """
    import os, sys, torch, qckpt

    class DyingBackend(qckpt.LocalBackend):
        writes_left = None

        def _tick(self):
            if self.writes_left is not None:
                if self.writes_left == 0:
                    os._exit(17)
                self.writes_left -= 1

        def put(self, key, data, *, exclusive=False):
            self._tick()
            super().put(key, data, exclusive=exclusive)

        def put_cache(self, key, data):
            self._tick()
            super().put_cache(key, data)

        def swap_ref(self, name, expected, new):
            self._tick()
            super().swap_ref(name, expected, new)

    backend = DyingBackend(sys.argv[1])
    repo = qckpt.Repository.init(backend, chunk_size=1024)
    repo.commit({"w": torch.arange(4096, dtype=torch.float32)}, step=1)
    backend.writes_left = int(sys.argv[2])
    repo.commit({"w": torch.arange(4096, dtype=torch.float32) * 2}, step=2)
    print("completed")
    """
)


@pytest.mark.parametrize("writes_before_crash", [0, 1, 2, 3, 4, 5, 6])
def test_crash_between_writes(tmp_path: Path, writes_before_crash: int) -> None:
    path = tmp_path / "repo"
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(writes_before_crash)], capture_output=True, text=True)
    completed = writes_before_crash >= 5  # pack, manifest, snapshot, ref log record, ref
    assert result.returncode == (0 if writes_before_crash >= 6 else 17), result.stderr  # 6: and the warm copy
    with qckpt.Repository.open(path) as repo:
        head = repo.snapshot("main")
        assert head.step == (2 if completed else 1)
        expected = torch.arange(4096, dtype=torch.float32) * (2 if completed else 1)
        assert torch.equal(repo.load("main")["w"], expected) and repo.fsck().ok
        next_snap = repo.commit({"w": torch.ones(3)}, step=3)  # the repository is usable
        assert next_snap.parents == (head.id,)
        repo.gc()
        assert repo._store.warm.snapshot_ids() == [next_snap.id]  # a copy the crash left behind is gone


KILLED_CHILD = textwrap.dedent(
    """
    import sys, torch, qckpt
    repo = qckpt.Repository.open(sys.argv[1])
    g = torch.Generator().manual_seed(int(sys.argv[2]))
    step = 0
    print("ready", flush=True)
    while True:
        step += 1
        repo.commit({"w": torch.randn(512, 256, generator=g), "step": step}, step=step)
    """
)


def test_sigkill_during_commits(local_repo_path: Path) -> None:
    """Kill a process that commits in a loop at arbitrary moments, several times."""
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(local_repo_path), str(round_)],
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.37 * round_)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with qckpt.Repository.open(local_repo_path) as repo:
            for snap in repo.log("main") if repo.branches() else []:
                assert repo.load(snap.id)["w"].shape == (512, 256)
    with qckpt.Repository.open(local_repo_path) as repo:
        assert len(repo.log("main")) >= 1
