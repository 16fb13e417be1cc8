"""S3 specifics against a real S3-compatible server (moto on loopback): URIs, request
economy, fresh caches, many writers, injected faults, bad buckets and credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import qckpt
from bench.compare import differences
from qckpt.backends import MemoryBackend, RetryingBackend, S3Backend, parse_s3_uri
from tests.qckpt.backends.faults import FaultyBackend
from bench.s3server import moto_server, new_bucket


def _tree(seed: int, tensors: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(3000, generator=g) for i in range(tensors)} | {"seed": seed}


def test_parse_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("s3://", "s3:///x", "s3://b/../x"):
        with pytest.raises(qckpt.InvalidInputError):
            parse_s3_uri(bad)


def test_roundtrip_and_fresh_cache(s3_uri: str, tmp_path: Path) -> None:
    with qckpt.Repository.init(s3_uri, cache_dir=tmp_path / "cache-a") as repo:
        snaps = [repo.commit(_tree(i), step=i) for i in range(3)]
    with qckpt.Repository.open(s3_uri, cache_dir=tmp_path / "cache-b") as repo:  # another "machine"
        assert [s.id for s in repo.log()] == [s.id for s in reversed(snaps)]
        assert differences(repo.load("main@1").tree(), _tree(1)) == []
        assert repo.fsck().ok


def test_request_economy(s3_uri: str) -> None:
    """A commit costs a handful of requests, independent of the number of tensors."""
    with qckpt.Repository.init(s3_uri) as repo:
        s3 = repo.backend.inner
        assert isinstance(s3, S3Backend)
        counts = []
        for tensors in (1, 40):
            before = dict(s3.requests)
            repo.commit(_tree(tensors, tensors=tensors))
            counts.append({op: n - before.get(op, 0) for op, n in s3.requests.items() if n - before.get(op, 0)})
        puts = [c.get("put_object", 0) for c in counts]
        assert puts[0] == puts[1] == 5  # pack, manifest, snapshot, ref log, ref: no lock ref
        # + LIST locks, GET gc generation, GET head; no read before the swap of a ref read here
        assert counts[1] == {"put_object": 5, "list_objects_v2": 1, "get_object": 2}, counts[1]


def test_a_download_that_breaks_off_is_transient_and_retried(s3_uri: str) -> None:
    """A connection dropped while the body streams in (after S3 answered) is a
    ``TransientBackendError``, which the retrying wrapper retries: not a raw botocore
    error that ends the restore."""
    import botocore.exceptions

    bucket, prefix = parse_s3_uri(s3_uri)
    backend = S3Backend(bucket, prefix)
    backend.put("packs/k", b"x" * 1000)
    real, broken = backend.client.get_object, []

    class BrokenBody:
        def read(self, *args: object) -> bytes:
            raise botocore.exceptions.ResponseStreamingError(error="connection reset by peer")

    def get_object(**kwargs: object) -> dict:
        response = real(**kwargs)
        if not broken:  # the first download breaks off
            broken.append(kwargs["Key"])
            response["Body"] = BrokenBody()
        return response

    backend.client.get_object = get_object  # type: ignore[method-assign]
    with pytest.raises(qckpt.TransientBackendError, match="broke off"):
        backend.get("packs/k")
    broken.clear()
    assert RetryingBackend(backend, base_delay_s=0.001).get_range("packs/k", 10, 5) == b"xxxxx" and len(broken) == 1


def test_remembered_etags_never_make_a_swap_succeed_against_a_change_elsewhere(s3_uri: str) -> None:
    """Two processes on one bucket: what one remembers of a ref the other changed
    only saves requests; the conditional write still decides."""
    bucket, prefix = parse_s3_uri(s3_uri)
    here, there = S3Backend(bucket, prefix), S3Backend(bucket, prefix)
    here.swap_ref("heads/x", None, "a")
    assert there.read_ref("heads/x") == "a"
    there.swap_ref("heads/x", "a", "b")
    with pytest.raises(qckpt.RefConflictError) as info:  # here still remembers "a"
        here.swap_ref("heads/x", "a", "c")
    assert info.value.actual == "b"
    assert here.list_refs("heads/") == {"heads/x": "b"} == there.list_refs("heads/")
    there.swap_ref("heads/x", "b", "a")  # back to a value here once saw, under a new write
    here.swap_ref("heads/x", "a", "d")
    assert there.read_ref("heads/x") == "d"
    there.swap_ref("heads/x", "d", None)
    with pytest.raises(qckpt.RefConflictError):  # deleted elsewhere: here remembers "d"
        here.swap_ref("heads/x", "d", "e")
    here.swap_ref("heads/x", None, None)  # absent, as asked
    assert here.read_ref("heads/x") is None
    there.swap_ref("heads/y", None, "v")
    with pytest.raises(qckpt.RefConflictError):  # "must be absent" against a ref made elsewhere
        here.swap_ref("heads/y", None, None)


def test_missing_bucket_fails_fast(s3_endpoint: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(qckpt.BackendError, match="does not exist") as info:
        qckpt.Repository.open("s3://no-such-bucket-qckpt/x")
    assert not isinstance(info.value, qckpt.TransientBackendError)
    assert time.monotonic() - t0 < 5  # permanent: not retried


def test_wrong_credentials_fail_fast_and_stay_secret() -> None:
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        backend = S3Backend("some-bucket", "p", endpoint_url=url)
        backend.client = __import__("boto3").client(
            "s3", endpoint_url=url, aws_access_key_id="AKIAWRONGKEY", aws_secret_access_key="TOPSECRETVALUE"
        )
        with pytest.raises(qckpt.BackendError, match="access denied") as info:
            qckpt.Repository.open(RetryingBackend(backend))
    assert "TOPSECRETVALUE" not in str(info.value) and not isinstance(info.value, qckpt.TransientBackendError)


def test_injected_faults_leave_commits_correct(s3_endpoint: str, tmp_path: Path) -> None:
    """Transient failures, before requests and after they took effect, are absorbed."""
    inner = S3Backend(new_bucket(s3_endpoint), "faulty")
    faulty = FaultyBackend(inner, rate=0.25, seed=7)
    retrying = RetryingBackend(faulty, attempts=12, base_delay_s=0.001)
    expected = {}
    with qckpt.Repository.init(retrying, cache_dir=tmp_path / "c") as repo:
        for i in range(12):
            expected[repo.commit(_tree(i), step=i).id] = _tree(i)
        assert faulty.injected["before"] > 5 and faulty.injected["after"] > 5
    with qckpt.Repository.open(RetryingBackend(S3Backend(inner.bucket, "faulty")), cache_dir=tmp_path / "d") as repo:
        history = repo.log()
        assert [s.step for s in history] == list(range(11, -1, -1))  # linear: no duplicate or lost commit
        for snap in history:
            assert differences(repo.load(snap.id).tree(), expected[snap.id]) == []
        assert repo.fsck().ok


def test_faults_on_any_backend_are_absorbed(tmp_path: Path) -> None:
    """The retry wrapper is backend-agnostic: the same faults over memory."""
    faulty = FaultyBackend(MemoryBackend(), rate=0.3, seed=3)
    with qckpt.Repository.init(RetryingBackend(faulty, attempts=12, base_delay_s=0.0)) as repo:
        snaps = [repo.commit(_tree(i), step=i) for i in range(8)]
        repo.create_branch("b", snaps[3].id)
        repo.delete_branch("b")
        repo.gc(qckpt.RetentionPolicy(keep_last=2))
        assert [s.step for s in repo.log()] == [7, 6] and repo.fsck().ok


WRITER = textwrap.dedent(
    """
    import sys, torch, qckpt
    uri, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with qckpt.Repository.open(uri) as repo:
        for i in range(n):
            repo.commit({"w": torch.full((500,), float(i)), "who": who, "i": i}, message=f"{who}-{i}")
    """
)


@pytest.mark.slow
def test_two_processes_commit_to_one_branch(s3_uri: str) -> None:
    qckpt.Repository.init(s3_uri).close()
    env = dict(os.environ)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, s3_uri, who, "30"], env=env, stderr=subprocess.PIPE, text=True)
               for who in ("A", "B")]  # fmt: skip
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    with qckpt.Repository.open(s3_uri) as repo:
        history = repo.log()
        assert sorted(s.message for s in history) == sorted(f"{w}-{i}" for w in "AB" for i in range(30))
        assert all(len(s.parents) == (1 if s is not history[-1] else 0) for s in history)  # linear
        assert [s.parents[0] for s in history[:-1]] == [s.id for s in history[1:]]
        for who in "AB":  # each writer's own commits stay in order
            mine = [int(s.message.split("-")[1]) for s in reversed(history) if s.message.startswith(who)]
            assert mine == list(range(30))
