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
        kill_lock_holder(s3_uri, tmp_path / "b", exclusive=killed == "exclusive", leases=(0.2, 2.0), announced=True)
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


def test_commits_write_no_lock_ref_unless_they_outlast_half_the_lease(s3_uri: str, tmp_path: Path) -> None:
    """A shared holder is unannounced at first; one still holding at half its lease
    creates its lock ref, and garbage collection then waits for it however long it holds."""
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "a") as repo:
        repo.commit({"w": torch.ones(4)}, step=0)
        _short_leases(repo)  # lease 1.6 s: announced at 0.8 s; GC waits 2 s after creating its lock
        backend, events = repo.backend, []
        inside, release = threading.Event(), threading.Event()

        def long_commit() -> None:
            with backend.lock(exclusive=False) as lease:
                events.append(("unannounced", backend.list_refs(LOCK_PREFIX) == {}))
                inside.set()
                release.wait(30)
                lease.check()  # kept valid by the announcement and its heartbeat
                events.append("shared released")

        def collect() -> None:
            with backend.lock(exclusive=True):
                events.append("exclusive")

        holder = threading.Thread(target=long_commit)
        holder.start()
        assert inside.wait(30)
        collector = threading.Thread(target=collect)
        collector.start()
        time.sleep(3.5)  # past the lease and GC's wait: only the announcement can hold GC back now
        assert events == [("unannounced", True)]
        assert len(backend.list_refs(LOCK_PREFIX)) == 2  # ours, announced, and GC's
        release.set()
        holder.join(30)
        collector.join(30)
        assert events == [("unannounced", True), "shared released", "exclusive"]
        assert backend.list_refs(LOCK_PREFIX) == {}


def test_gc_waits_out_unannounced_commits(s3_uri: str, tmp_path: Path) -> None:
    """A commit that listed before GC's lock existed is invisible to GC: GC must not
    decide before such a commit's lease is over."""
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "a") as repo:
        _short_leases(repo)
        backend, acquired = repo.backend, []
        with backend.lock(exclusive=False):  # unannounced, released after 0.3 s
            collector = threading.Thread(target=lambda: acquired.append(_timed_exclusive(backend)))
            started = time.monotonic()
            collector.start()
            time.sleep(0.3)
        collector.join(30)
        assert acquired and acquired[0] - started >= 2.0  # the stale time of the lock, from GC's creation


def _timed_exclusive(backend: object) -> float:
    with backend.lock(exclusive=True):  # type: ignore[attr-defined]
        return time.monotonic()


def test_gc_never_deletes_what_an_unannounced_commit_dedups_against(s3_uri: str, tmp_path: Path) -> None:
    """A commit that dedups against an expiring snapshot's objects is slow to publish;
    a garbage collection that starts meanwhile (and cannot see the commit: no lock
    ref yet) must not delete those objects."""
    contents = [{"w": torch.arange(3000.0) + k, "k": k} for k in (0, 1)]
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "a", chunk_size=1024) as repo:
        _short_leases(repo)
        repo.commit(contents[0], step=0)
        repo.commit(contents[1], step=1)  # the first snapshot now expires under keep_last=1
        inner, publishing = repo.backend.inner, threading.Event()  # type: ignore[attr-defined]
        put = inner.put

        def slow_snapshot_put(key: str, data: bytes, **kwargs: object) -> None:
            if key.startswith("snapshots/"):
                publishing.set()
                time.sleep(1.2)  # objects written (deduplicated), not yet published
            put(key, data, **kwargs)

        inner.put = slow_snapshot_put
        committer = threading.Thread(target=lambda: repo.commit(contents[0], step=2))
        committer.start()
        assert publishing.wait(30)
        with qckpt.Repository.open(s3_uri, cache_dir=tmp_path / "gc") as other:
            _short_leases(other)
            other.gc(qckpt.RetentionPolicy(keep_last=1, reflog_grace=0))
        committer.join(30)
        inner.put = put
        assert differences(repo.load("main").tree(), contents[0]) == []
        assert [s.step for s in repo.log()] == [2]  # what the other process's GC expired is not shown from a cache
        report = repo.fsck()
        assert report.ok, report
