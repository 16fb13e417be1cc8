"""``python -m bench s3``: committing to S3 versus local disk versus torch.save + upload.

Trains the reference model and, after every step, stores the same training
state three ways, side by side in one process:

* ``qckpt-local``: ``Repository.commit`` to a local directory;
* ``qckpt-s3``: ``Repository.commit`` to ``s3://bucket/qckpt``;
* ``torch.save+upload``: ``torch.save`` to memory, then one S3 upload (what
  users do today).

Reports per method the mean time per checkpoint, the bytes at rest (qckpt: history and warm copies), and for the
S3 methods the requests and bytes sent per checkpoint; then the time to restore
the latest checkpoint from S3 in a fresh repository (empty index cache) versus
download + ``torch.load``; then (not with ``--quick``) how long a SIGKILLed
lock holder stalls the others with the default lock lease: a committer killed
while holding the lock shared, then the GC behind it; a GC killed while holding
it exclusive, then the commit behind it. Without ``--endpoint`` it starts moto's S3 server on
loopback: timings then measure a local Python server, not AWS; request counts
and bytes are what AWS would see.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import torch

import qckpt
from qckpt.backends import RetryingBackend, S3Backend
from qckpt.backends.s3 import _new_session as new_session
from bench.s3server import CREDENTIALS, moto_server, new_bucket
from bench.workload import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, 5 checkpoints")
    parser.add_argument("--commits", type=int, default=10)
    parser.add_argument("--endpoint", help="an existing S3-compatible endpoint (default: start moto on loopback)")
    parser.add_argument("--json", type=Path, help="also write the results here")


@contextmanager
def _endpoint(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    for key, value in CREDENTIALS.items():
        os.environ.setdefault(key, value)
    with moto_server() as started:
        yield started


_HOLD_LOCK = textwrap.dedent(
    """
    import sys, time, qckpt
    from qckpt.backends import LOCK_PREFIX, S3Backend
    if sys.argv[5]:
        S3Backend.lock_refresh_s, S3Backend.lock_stale_s = map(float, sys.argv[5].split(","))
    repo = qckpt.Repository.open(sys.argv[1], cache_dir=sys.argv[2], endpoint_url=sys.argv[4] or None)
    with repo.backend.lock(exclusive=sys.argv[3] == "exclusive"):
        while sys.argv[6] and not repo.backend.list_refs(LOCK_PREFIX):
            time.sleep(0.05)  # a shared holder announces itself after half its lease
        print("held", flush=True)
        time.sleep(3600)
    """
)


def kill_lock_holder(
    uri: str,
    cache_dir: Path,
    *,
    exclusive: bool,
    endpoint_url: str | None = None,
    leases: tuple[float, float] | None = None,
    announced: bool = False,
) -> None:
    """Start a process that takes the writer lock of ``uri`` (with ``leases`` =
    (refresh_s, stale_s) if given), and SIGKILL it while it holds it; ``announced``:
    once its lock ref exists (a shared holder creates one only after half its lease)."""
    mode = "exclusive" if exclusive else "shared"
    lease_arg = ",".join(map(str, leases)) if leases else ""
    args = [sys.executable, "-c", _HOLD_LOCK, uri, str(cache_dir), mode, endpoint_url or "", lease_arg, "1" if announced else ""]
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        raise RuntimeError("the lock holder did not start")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()


def _stalls_after_kill(repo: qckpt.Repository, uri: str, endpoint: str, tmp: Path) -> dict[str, float]:
    """Seconds the next GC waits behind a killed committer, and the next commit behind a killed GC."""
    kill_lock_holder(uri, tmp / "killed", exclusive=False, endpoint_url=endpoint, announced=True)
    t0 = time.perf_counter()
    repo.gc(qckpt.RetentionPolicy(keep_last=1000))
    gc_behind_killed_commit = time.perf_counter() - t0
    kill_lock_holder(uri, tmp / "killed", exclusive=True, endpoint_url=endpoint)
    t0 = time.perf_counter()
    repo.commit({"after-kill": torch.zeros(1)}, branch="stall-probe")
    commit_behind_killed_gc = time.perf_counter() - t0
    return {"gc_behind_killed_commit_s": gc_behind_killed_commit, "commit_behind_killed_gc_s": commit_behind_killed_gc}


RESTORES = 9


def _restore_latest(uri: str, endpoint: str, bucket: str, torch_key: str, trainer: Trainer, tmp: Path) -> dict[str, float]:
    """Best of ``RESTORES`` restores of the latest state (alternating with the
    baseline: moto's downloads of the same bytes vary by half between
    requests), each from a new S3 client in a new
    boto3 session (a restarted process makes both either way: qckpt one per
    repository, ``boto3.client`` its default session) and, for qckpt, an empty
    index cache; the restore alone is timed too. Both sessions reuse the service
    models this process loaded already, which a restarted process loads once
    for either (~60 ms)."""
    times: dict[str, list[float]] = {"qckpt open+restore": [], "qckpt restore": [],
                                     "client+download+torch.load": [], "download+torch.load": []}  # fmt: skip
    for attempt in range(RESTORES):
        t0 = time.perf_counter()
        with qckpt.Repository.open(uri, endpoint_url=endpoint, cache_dir=tmp / f"fresh-{attempt}") as fresh:
            t1 = time.perf_counter()
            fresh.restore(trainer.state, "main")
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        client = new_session().client("s3", endpoint_url=endpoint)
        t4 = time.perf_counter()
        torch.load(io.BytesIO(client.get_object(Bucket=bucket, Key=torch_key)["Body"].read()), weights_only=False)
        t5 = time.perf_counter()
        for name, seconds in zip(times, (t2 - t0, t2 - t1, t5 - t3, t5 - t4)):
            times[name].append(seconds)
    return {name: min(values) for name, values in times.items()}


def _at_rest(location: str | Path, endpoint: str, cache_dir: Path) -> int:
    """Bytes a closed repository holds: its history and its warm copies."""
    with qckpt.Repository.open(location, endpoint_url=endpoint, cache_dir=cache_dir) as repo:
        stats = repo.stats()
    return stats.stored_bytes + stats.warm_bytes


def _s3_backend(repo: qckpt.Repository) -> S3Backend:
    """The S3 backend under the retry wrapper that ``s3://`` locations get."""
    backend = repo.backend.inner if isinstance(repo.backend, RetryingBackend) else repo.backend
    assert isinstance(backend, S3Backend)
    return backend


def run(args: argparse.Namespace) -> dict:
    size, commits = ("tiny", 5) if args.quick else ("3m", args.commits)
    trainer = Trainer(size, total_steps=commits + 1)
    with _endpoint(args.endpoint) as endpoint, tempfile.TemporaryDirectory(prefix="qckpt-bench-s3-") as tmp:
        bucket = new_bucket(endpoint)
        client = boto3.client("s3", endpoint_url=endpoint)
        local = qckpt.Repository.init(Path(tmp) / "local")
        remote = qckpt.Repository.init(f"s3://{bucket}/qckpt", endpoint_url=endpoint, cache_dir=Path(tmp) / "cache")
        times: dict[str, list[float]] = {"qckpt-local": [], "qckpt-s3": [], "torch.save+upload": []}
        upload_bytes = 0
        for i in range(commits):
            loss = trainer.train_step()
            t0 = time.perf_counter()
            local.commit(trainer.state, metrics={"loss": loss})
            t1 = time.perf_counter()
            remote.commit(trainer.state, metrics={"loss": loss})
            t2 = time.perf_counter()
            buffer = io.BytesIO()
            torch.save(trainer.state.capture(), buffer)
            upload_bytes += buffer.tell()
            buffer.seek(0)
            client.upload_fileobj(buffer, bucket, f"torch/step-{i}.pt")
            t3 = time.perf_counter()
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(dt)
        requests, sent = dict(_s3_backend(remote).requests), _s3_backend(remote).bytes_sent
        stalls = {} if args.quick else _stalls_after_kill(remote, f"s3://{bucket}/qckpt", endpoint, Path(tmp))
        local.close()
        remote.close()  # writes the head's warm copy (on S3 at most one a minute, and at close)
        stored = {name: _at_rest(location, endpoint, Path(tmp) / "stats")
                  for name, location in (("qckpt-local", Path(tmp) / "local"), ("qckpt-s3", f"s3://{bucket}/qckpt"))}
        stored["torch.save+upload"] = upload_bytes

        restores = _restore_latest(f"s3://{bucket}/qckpt", endpoint, bucket, f"torch/step-{commits - 1}.pt", trainer, Path(tmp))

    per_commit = {op: n / commits for op, n in requests.items()}
    results = {
        "model": size, "params": trainer.num_params(), "commits": commits,
        "methods": {m: {"save_s": statistics.mean(times[m]), "bytes": stored[m]} for m in times},
        "s3_requests_per_commit": per_commit,
        "s3_bytes_sent_per_commit": sent / commits,
        "torch_upload_bytes_per_commit": upload_bytes / commits,
        "restore_latest_s": restores,
        "lock_lease_s": S3Backend.lock_stale_s, "stall_after_kill_s": stalls,
    }  # fmt: skip
    base = results["methods"]["torch.save+upload"]
    print(f"{size} model ({trainer.num_params():,} parameters), {commits} checkpoints, endpoint {endpoint}")
    print(f"{'method':22s} {'s/ckpt':>8s} {'vs torch':>9s} {'stored':>12s} {'vs torch':>9s}")
    for name, m in results["methods"].items():
        print(f"{name:22s} {m['save_s']:8.3f} {m['save_s'] / base['save_s']:8.2f}x {m['bytes'] / 1e6:10.1f}MB "
              f"{m['bytes'] / base['bytes']:8.2f}x")  # fmt: skip
    print("S3 requests per qckpt commit: " + ", ".join(f"{op} {n:.1f}" for op, n in sorted(per_commit.items())))
    print(f"bytes sent per commit: qckpt {sent / commits / 1e6:.2f} MB, torch.save+upload {upload_bytes / commits / 1e6:.2f} MB")
    print(f"restore latest (best of {RESTORES}): qckpt open (new client, empty cache) + restore "
          f"{restores['qckpt open+restore']:.3f}s vs new client + download + torch.load {restores['client+download+torch.load']:.3f}s "
          f"({restores['qckpt open+restore'] / restores['client+download+torch.load']:.2f}x); with the repository open / client made: "
          f"{restores['qckpt restore']:.3f}s vs {restores['download+torch.load']:.3f}s "
          f"({restores['qckpt restore'] / restores['download+torch.load']:.2f}x)")
    if stalls:
        print(f"stall after a SIGKILLed lock holder (lease {S3Backend.lock_stale_s:.0f}s): GC behind a killed commit "
              f"{stalls['gc_behind_killed_commit_s']:.1f}s, commit behind a killed GC {stalls['commit_behind_killed_gc_s']:.1f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results
