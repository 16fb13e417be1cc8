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

# A local backend that ends the process (os._exit, no cleanup) just before its Nth write
# (``writes_left``; deletions count too with ``deletes``).
DYING_BACKEND = textwrap.dedent(
    """
    import os, sys, torch, qckpt

    class DyingBackend(qckpt.LocalBackend):
        writes_left = None
        deletes = False

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

        def delete(self, key):
            if self.deletes:
                self._tick()
            super().delete(key)
    """
)

# The child commits snapshot 1 cleanly, then dies just before the Nth write of snapshot 2's
# commit: pack, manifest, snapshot, ref log, ref, then (after the commit is durable) its warm copy.
CHILD = DYING_BACKEND + textwrap.dedent(
    """
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


# A torch.distributed.checkpoint save whose encoding is deferred: the child saves step 1
# (compacted), then dies just before the Nth write or delete of step 2's save and compaction:
# the raw pack, the manifest, the snapshot, the ref log record, the ref; then the compaction's
# pack, the raw pack's deletion, the part manifest, the warm part.
DCP_CHILD = DYING_BACKEND + textwrap.dedent(
    """
    import warnings
    import torch.distributed.checkpoint as dcp
    from qckpt.distributed import QckptWriter
    warnings.simplefilter("ignore")

    def state(step):
        g = torch.Generator().manual_seed(step)
        return {"w": torch.randn(64, 1024, generator=g), "b": torch.randn(1024, generator=g) + step}

    backend = DyingBackend(sys.argv[1])
    backend.deletes = True
    repo = qckpt.Repository.init(backend, chunk_size=16384)
    writer = QckptWriter(repo)
    dcp.save(state(1), storage_writer=writer)
    writer.wait()
    backend.writes_left = int(sys.argv[2])
    dcp.save(state(2), storage_writer=writer)
    writer.close()
    print("completed")
    """
)


@pytest.mark.parametrize("writes_before_crash", range(10))
def test_crash_during_a_deferred_save_or_its_compaction(tmp_path: Path, writes_before_crash: int) -> None:
    path = tmp_path / "repo"
    result = subprocess.run([sys.executable, "-c", DCP_CHILD, str(path), str(writes_before_crash)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == (0 if writes_before_crash >= 9 else 17), result.stderr
    published = writes_before_crash >= 5  # ... the ref

    def check(repo: qckpt.Repository) -> None:
        assert len(repo.log("main")) == (2 if published else 1) and repo.fsck().ok
        for snapshot, step in zip(repo.log("main"), (2, 1) if published else (1,)):
            g = torch.Generator().manual_seed(step)
            expected = {"w": torch.randn(64, 1024, generator=g), "b": torch.randn(1024, generator=g) + step}
            tree = repo.load(snapshot.id).tree()["dcp"]["tensors"]
            assert all(torch.equal(tree[k], v) for k, v in expected.items()), (snapshot.step, step)

    with qckpt.Repository.open(path) as repo:
        check(repo)
        raw_packs_left = sum(1 for p in repo._store.pack_ids()
                             if any(loc.codec == 7 for loc in repo._store.pack_contents(p).values()))  # fmt: skip
        assert raw_packs_left == (1 if 1 <= writes_before_crash <= 6 else 0)  # compacted once its pack is deleted
        before = repo.stats().stored_bytes
        repo.gc()  # what no compaction will encode is compressed on its own
        assert (repo.stats().stored_bytes < before) == (1 <= writes_before_crash <= 6)  # garbage, or compressed
        assert not any(loc.codec == 7 for p in repo._store.pack_ids() for loc in repo._store.pack_contents(p).values())
        check(repo)
