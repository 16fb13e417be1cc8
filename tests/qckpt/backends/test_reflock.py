"""The writer lock built from refs (S3), against the real server: a crashed holder
stalls others only for the lease, its lock ref is cleared away, opening and
reading never wait for the lock, and a holder whose lease lapsed stops before
publishing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

import qckpt
from bench.compare import differences
from bench.s3 import kill_lock_holder
from qckpt.backends import LOCK_PREFIX

def _short_leases(repo: qckpt.Repository) -> None:
    repo.backend.inner.lock_refresh_s, repo.backend.inner.lock_stale_s = 0.2, 2.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("killed", ["shared", "exclusive"])
def test_a_killed_holder_blocks_others_only_for_the_lease(s3_uri: str, tmp_path: Path, killed: str) -> None:
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "a") as repo:
        repo.commit({"w": torch.ones(4)}, step=0)
        _short_leases(repo)
        kill_lock_holder(s3_uri, tmp_path / "b", exclusive=killed == "exclusive")
        assert list(repo.backend.list_refs(LOCK_PREFIX)) != []  # the dead holder's lock is still there
        started = time.monotonic()
        if killed == "shared":  # a dead committer: garbage collection waits for its lease, then runs
            repo.gc(qckpt.RetentionPolicy(keep_last=1))
        else:  # a dead garbage collector: the next commit waits for its lease, then lands
            repo.commit({"w": torch.zeros(4)}, step=1)
        waited = time.monotonic() - started
        assert waited < 30, waited  # the old fixed staleness made this ~300 s
        assert repo.backend.list_refs(LOCK_PREFIX) == {}  # cleared away, not left to accumulate
        assert repo.fsck().ok


def test_open_and_restore_never_wait_for_the_lock(s3_uri: str, tmp_path: Path) -> None:
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "writer") as repo:
        snap = repo.commit({"w": torch.arange(5.0)}, step=3)
        held, release = threading.Event(), threading.Event()

        def hold_exclusive() -> None:  # a long garbage collection elsewhere
            with repo.backend.lock(exclusive=True):
                held.set()
                release.wait(120)

        holder = threading.Thread(target=hold_exclusive)
        holder.start()
        try:
            assert held.wait(30)
            results: list[object] = []

            def read_elsewhere() -> None:  # a fresh process on another machine: empty index cache
                with qckpt.Repository.open(s3_uri, cache_dir=tmp_path / "reader") as other:
                    results.append(other.load(snap.id).tree())

            reader = threading.Thread(target=read_elsewhere)
            reader.start()
            reader.join(60)
            assert not reader.is_alive(), "opening or reading waited for the writer lock"
            assert len(results) == 1 and differences(results[0], {"w": torch.arange(5.0)}) == []
        finally:
            release.set()
            holder.join()


def test_a_lapsed_lease_stops_the_commit_before_it_publishes(s3_uri: str, tmp_path: Path) -> None:
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "a") as repo:
        first = repo.commit({"w": torch.ones(4)}, step=0)
        backend = repo.backend.inner  # type: ignore[attr-defined]
        backend.lock_refresh_s, backend.lock_stale_s = 60.0, 0.5  # a heartbeat that never comes in time
        store = repo._store

        def build(txn: object) -> object:
            time.sleep(1.0)  # a suspended process: the lock lapses meanwhile
            return lambda head: store.snapshot(first.id)  # republish the same record: only the check matters

        with pytest.raises(qckpt.LockLostError, match="lease"):
            store.transaction("main", build, cause="test")
        assert repo.branches()["main"] == first.id  # nothing moved
        assert repo.backend.list_refs(LOCK_PREFIX) == {}


def test_stale_locks_of_a_foreign_clock_are_judged_by_their_renewal_time(s3_uri: str, tmp_path: Path) -> None:
    """A lock renewed recently is honoured however old it is; one not renewed is not."""
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "a") as repo:
        _short_leases(repo)
        now = time.time()
        live = json.dumps({"exclusive": False, "created": now - 3600, "time": now + 1.5, "host": "h", "pid": 1})
        repo.backend.swap_ref(f"{LOCK_PREFIX}live", None, live)
        started = time.monotonic()
        repo.gc(qckpt.RetentionPolicy(keep_last=1))  # waits for the live one to go stale (it is never renewed)
        assert time.monotonic() - started >= 1.5
        assert repo.backend.list_refs(LOCK_PREFIX) == {}
