"""The repository: commit training states, restore and load snapshots, refs.

Write order of a commit (invariant 2): packs -> index -> manifest -> snapshot
-> ref compare-and-swap. A crash anywhere leaves unreferenced garbage at worst;
a ref never points at anything incomplete.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qckpt._encoding import EncodePlanner, chunk_view
from qckpt._hot import HotSnapshot, HotTier, StagedArray, stage
from qckpt._ids import ID_HEX, digest, hex_id
from qckpt._diff import TensorDiff, diff_snapshots
from qckpt._fsck import FsckReport, check_repository
from qckpt._gc import GC_GENERATION_REF, GcReport, RetentionPolicy, collect_garbage
from qckpt._index import ChunkIndex, LmdbIndex, MemoryIndex
from qckpt._join import average, pick_best
from qckpt._lossy import LossyTier, check_main_line, quantize
from qckpt._objects import EncodedObject, encode_object
from qckpt._packs import TRAILER_SIZE, ChunkLocation, PackBuilder, footer_span, pack_key, read_pack_footer
from qckpt._predict import ParamRule, parameter_rules
from qckpt._reader import ChunkReader
from qckpt._records import LOSSY_ANNOTATION, CommitStats, Manifest, Snapshot, TensorEntry, manifest_key, snapshot_key
from qckpt._refs import BRANCH_PREFIX, TAG_PREFIX, check_ref_name
from qckpt._tensors import is_floating, numpy_dtype, torch_dtype
from qckpt._tree import decode_tree, encode_tree
from qckpt._view import SnapshotView
from qckpt._writer import CommitHandle, CommitWriter
from qckpt._zarr_export import export_zarr
from qckpt._zarr_store import SnapshotStore
from qckpt.backends import Backend, LocalBackend, MemoryBackend, RetryingBackend, S3Backend, parse_s3_uri
from qckpt.errors import (
    AlreadyExistsError,
    AmbiguousRevisionError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    ObjectNotFoundError,
    RefConflictError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    StateMismatchError,
)
from qckpt.state import TrainingState

REPOSITORY_VERSION = 3  # 2: delta and predictive codecs, pack footers with dependencies; 3: lossy-tier payloads
CONFIG_KEY = "config"
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_MAX_CHAIN = 16
DEFAULT_HOT_SNAPSHOTS = 2
DEFAULT_MAX_PENDING = 2
PACK_TARGET_SIZE = 64 << 20
_STEP_REVISION = re.compile(r"(.+)@([0-9]+)")
_log = logging.getLogger("qckpt")
_MAX_PUBLISH_ATTEMPTS = 1000


@dataclass(frozen=True)
class RepositoryConfig:
    """Settings fixed when the repository is created (stored under ``config``)."""

    repository_id: str
    chunk_size: int
    compression_level: int
    version: int = REPOSITORY_VERSION
    max_chain: int = DEFAULT_MAX_CHAIN  # longest dependency chain a commit may create (1: no deltas)


@dataclass(frozen=True)
class RepositoryStats:
    """Storage accounting over every snapshot in the repository."""

    snapshots: int
    packs: int
    raw_bytes: int  # tensor bytes summed over all snapshots, as if each were saved in full
    unique_raw_bytes: int  # raw bytes of distinct chunks (after dedup)
    stored_bytes: int  # bytes in packs, manifests and snapshots

    @property
    def dedup_ratio(self) -> float:
        return self.raw_bytes / self.unique_raw_bytes if self.unique_raw_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0


Location = str | os.PathLike[str] | Backend


def _backend_for(location: Location, endpoint_url: str | None) -> Backend:
    if isinstance(location, Backend):
        return location
    text = os.fspath(location)
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_uri(text)
        return RetryingBackend(S3Backend(bucket, prefix, endpoint_url=endpoint_url))
    if text.startswith("file://"):
        return LocalBackend(Path(text.removeprefix("file://")))
    if "://" in text:
        raise InvalidInputError(f"unsupported repository URI {text!r} (use a path, file:// or s3://)")
    return LocalBackend(Path(text))


def _index_for(backend: Backend, config: RepositoryConfig, cache_dir: str | os.PathLike[str] | None) -> ChunkIndex:
    """Local repositories keep their index inside; memory ones in memory; remote ones
    (S3) in a local cache, ``cache_dir`` or ``$QCKPT_CACHE_DIR`` or ``~/.cache/qckpt``."""
    if isinstance(backend, LocalBackend):
        return LmdbIndex(backend.root / ".index")
    if isinstance(backend, MemoryBackend):
        return MemoryIndex()
    root = Path(cache_dir or os.environ.get("QCKPT_CACHE_DIR") or Path.home() / ".cache" / "qckpt")
    return LmdbIndex(root / config.repository_id / "index")


class Repository:
    """A qckpt repository on one backend. Create with ``init``, reopen with ``open``.

    Methods may be called from several threads; a commit and reads can run
    concurrently. Several processes may share a repository: ref updates are
    compare-and-swap, so a lost race raises ``RefConflictError`` instead of
    silently dropping a commit. Use as a context manager or call ``close``.

    The hot tier keeps the tensors of the last ``hot_snapshots`` committed or
    restored snapshots in host memory (at most ``hot_bytes`` beyond the newest,
    when given): a commit on top of a hot snapshot is encoded as deltas and
    optimizer-aware predictions against it. ``hot_snapshots=0`` disables both.
    """

    def __init__(
        self,
        backend: Backend,
        config: RepositoryConfig,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        hot_snapshots: int = DEFAULT_HOT_SNAPSHOTS,
        hot_bytes: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if hot_snapshots < 0 or (hot_bytes is not None and hot_bytes < 0) or max_pending < 1:
            raise InvalidInputError("hot_snapshots and hot_bytes must not be negative, max_pending at least 1")
        self.backend = backend
        self.config = config
        self._index = _index_for(backend, config, cache_dir)
        self._workers = os.cpu_count() or 2  # encoding parallelism
        # reads mostly wait on storage (network for S3): more threads than cores
        self._pool = ThreadPoolExecutor(max_workers=max(16, self._workers), thread_name_prefix="qckpt")
        self._reader = ChunkReader(backend, self._locate, self._pool)
        self._hot = HotTier(hot_snapshots, hot_bytes)
        self._snapshots: dict[str, Snapshot] = {}
        self._rebuild_lock = threading.Lock()
        self._writer = CommitWriter(self._write_commit, max_pending, f"qckpt-writer {backend.uri}")

    # -- lifecycle -----------------------------------------------------------
    @classmethod
    def init(
        cls,
        location: Location,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        max_chain: int = DEFAULT_MAX_CHAIN,
        endpoint_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        hot_snapshots: int = DEFAULT_HOT_SNAPSHOTS,
        hot_bytes: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Repository:
        """Create an empty repository at ``location``: a path, ``file://`` or
        ``s3://bucket/prefix`` URI, or a ``Backend``.

        Raises ``AlreadyExistsError`` if one exists there; ``chunk_size`` must be a
        positive multiple of 64 bytes, ``compression_level`` a zstd level (1-19).
        ``max_chain`` (1-255) bounds dependency chains: restoring any chunk decodes
        at most that many objects along one chain; 1 stores every chunk on its own.
        ``endpoint_url`` selects an S3-compatible server (default: boto3's
        configuration, including ``AWS_ENDPOINT_URL``); ``cache_dir`` is where
        remote repositories keep their local chunk-index cache. ``hot_snapshots``
        and ``hot_bytes`` size the hot tier, ``max_pending`` bounds asynchronous
        commits in flight (see the class and ``commit_async``).
        """
        if chunk_size <= 0 or chunk_size % 64:
            raise InvalidInputError(f"chunk_size must be a positive multiple of 64 bytes, got {chunk_size}")
        if not 1 <= compression_level <= 19:
            raise InvalidInputError(f"compression_level must be 1..19, got {compression_level}")
        if not 1 <= max_chain <= 255:
            raise InvalidInputError(f"max_chain must be 1..255, got {max_chain}")
        backend = _backend_for(location, endpoint_url)
        if isinstance(backend, LocalBackend) and backend.root.exists() and not backend.root.is_dir():
            raise InvalidInputError(f"{backend.root} exists and is not a directory")
        config = RepositoryConfig(uuid.uuid4().hex, chunk_size, compression_level, max_chain=max_chain)
        try:
            backend.put(CONFIG_KEY, json.dumps(asdict(config), indent=1).encode(), exclusive=True)
        except AlreadyExistsError:
            raise AlreadyExistsError(f"a repository exists already at {backend.uri}") from None
        return cls(backend, config, cache_dir, hot_snapshots=hot_snapshots, hot_bytes=hot_bytes, max_pending=max_pending)

    @classmethod
    def open(
        cls,
        location: Location,
        *,
        endpoint_url: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        hot_snapshots: int = DEFAULT_HOT_SNAPSHOTS,
        hot_bytes: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> Repository:
        """Open an existing repository (see ``init`` for the arguments);
        ``RepositoryNotFoundError`` if there is none."""
        backend = _backend_for(location, endpoint_url)
        try:
            doc = json.loads(backend.get(CONFIG_KEY))
        except ObjectNotFoundError:
            raise RepositoryNotFoundError(f"no qckpt repository at {backend.uri} (create one with init)") from None
        except ValueError as e:
            raise IntegrityError(f"repository config at {backend.uri} is damaged: {e}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("version"), int):
            raise IntegrityError(f"repository config at {backend.uri} is damaged")
        if doc["version"] > REPOSITORY_VERSION:
            raise FormatVersionError(
                f"repository at {backend.uri} has format version {doc['version']}; "
                f"this qckpt reads up to {REPOSITORY_VERSION}: upgrade qckpt"
            )
        try:
            repo = cls(backend, RepositoryConfig(**doc), cache_dir, hot_snapshots=hot_snapshots, hot_bytes=hot_bytes, max_pending=max_pending)
        except TypeError as e:
            raise IntegrityError(f"repository config at {backend.uri} is damaged: {e}") from e
        if len(repo._index) == 0 and backend.list("packs/"):
            repo.rebuild_index()
        return repo

    def close(self) -> None:
        """Write every pending commit, finish background work, release the index and
        backend. Raises a background commit failure not reported yet."""
        try:
            self._writer.close()
        finally:
            self._pool.shutdown(wait=True)
            self._index.close()
            self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Repository({self.backend.uri!r})"

    # -- commit --------------------------------------------------------------
    def commit(
        self,
        state: TrainingState | Mapping[str, Any],
        *,
        branch: str = "main",
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        message: str = "",
        on_conflict: str = "retry",
        lossy: LossyTier | None = None,
    ) -> Snapshot:
        """Store ``state`` as a new snapshot on ``branch`` (created if absent) and return it
        once it is durable: ``commit_async(...).wait()``.

        ``state`` is a ``TrainingState`` (its step is used unless ``step`` is given)
        or any plain tree of dicts, lists, tensors and plain values. The state is
        validated before anything is written (``UnsupportedValueError`` names the
        offending key). If another writer moved the branch meanwhile, the commit
        is re-parented onto the new head and published again (only a snapshot
        record is rewritten); with ``on_conflict="raise"`` it raises
        ``RefConflictError`` instead, and the snapshot stays readable by id until
        garbage collection. Holds the writer lock shared (GC waits for it).

        ``lossy=LossyTier(mantissa_bits)`` stores floats rounded to that
        precision (opt-in, for exploratory branches; refused on ``main`` unless
        ``allow_main``): the snapshot then holds the rounded values, bit-exact,
        and records ``annotations["lossy"]``.
        """
        return self.commit_async(
            state, branch=branch, step=step, metrics=metrics, message=message, on_conflict=on_conflict, lossy=lossy
        ).wait()

    def commit_async(
        self,
        state: TrainingState | Mapping[str, Any],
        *,
        branch: str = "main",
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        message: str = "",
        on_conflict: str = "retry",
        lossy: LossyTier | None = None,
    ) -> CommitHandle:
        """Stage ``state`` and commit it in the background (arguments as ``commit``).

        Returns once the tensors are copied into host memory the repository owns
        (pinned memory and one synchronisation for CUDA tensors): training may
        change them right away. Validation errors are raised here. Chunking,
        encoding, writing and the ref update run on the repository's writer
        thread, in submission order; at most ``max_pending`` commits are in
        flight (this call blocks while that many are). A background failure is
        raised by the returned handle's ``wait()`` and by the next
        ``commit``/``commit_async``/``flush``; commits queued behind it are not
        written (``CommitAbortedError``), so the branch stays at the last good
        snapshot.
        """
        check_ref_name(branch)
        if on_conflict not in ("retry", "raise"):
            raise InvalidInputError(f"on_conflict must be 'retry' or 'raise', got {on_conflict!r}")
        if lossy is not None:
            if not isinstance(lossy, LossyTier):
                raise InvalidInputError(f"lossy must be a LossyTier or None, got {lossy!r}")
            check_main_line(branch, lossy.annotation(), lossy.allow_main, "this commit")
        rules: dict[str, ParamRule] = {}
        if isinstance(state, TrainingState):
            tree: Any = state.capture()
            step = state.step if step is None else step
            rules = parameter_rules(tree, state.optimizer_layouts())
        else:
            tree = state
        metrics = dict(metrics or {})
        bad = [k for k, v in metrics.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            raise InvalidInputError(f"metrics must map names to numbers; bad entries: {bad}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise InvalidInputError(f"step must be an int, got {step!r}")
        encoded, leaves = encode_tree(tree)
        job = _CommitJob(encoded, stage(leaves, self._hot.take), rules, branch, step, metrics, message, on_conflict, lossy)
        return self._writer.submit(job)

    def flush(self) -> None:
        """Wait until every commit submitted so far is durable (raises a background failure not reported yet)."""
        self._writer.flush()

    def _write_commit(self, job: _CommitJob) -> Snapshot:
        """The background half of a commit (runs on the writer thread)."""
        staged = quantize(job.staged, job.lossy) if job.lossy is not None else job.staged
        with self.backend.lock(exclusive=False):  # GC must not sweep what this commit dedups against
            self._upgrade_config()
            self._sync_index()
            head = self.backend.read_ref(BRANCH_PREFIX + job.branch)
            tensors, stats = self._store_arrays(staged, self._hot.get(head), job.rules, job.step)
            manifest_id = self._put_manifest(Manifest(job.encoded, tuple(tensors)))

            def snapshot_on(parent: str | None) -> Snapshot:
                return Snapshot.new(
                    manifest=manifest_id, parents=(parent,) if parent else (), step=job.step, time=time.time(),
                    message=job.message, metrics=job.metrics, stats=stats,
                    annotations={LOSSY_ANNOTATION: job.lossy.annotation()} if job.lossy else {},
                )  # fmt: skip

            snapshot = self._publish(job.branch, head, snapshot_on, retry=job.on_conflict == "retry")
        arrays = {a.path: a for a in staged}
        self._hot.put(HotSnapshot(snapshot.id, arrays, {t.path: t for t in tensors}, job.rules, job.step))
        return snapshot

    def _upgrade_config(self) -> None:
        """Before the first write to a repository of an older format version, record
        the current version, so an older qckpt refuses it instead of misreading it."""
        if self.config.version < REPOSITORY_VERSION:
            self.config = RepositoryConfig(**{**asdict(self.config), "version": REPOSITORY_VERSION})
            self.backend.put(CONFIG_KEY, json.dumps(asdict(self.config), indent=1).encode())

    def _put_manifest(self, manifest: Manifest) -> str:
        data = manifest.to_bytes()
        manifest_id = hex_id(data)
        self.backend.put(manifest_key(manifest_id), data)
        return manifest_id

    def _publish(
        self, branch: str, head: str | None, snapshot_on: Callable[[str | None], Snapshot], *, retry: bool = True
    ) -> Snapshot:
        """Write ``snapshot_on(head)``'s record, then move ``branch`` from ``head`` to it
        (compare-and-swap). If the branch moved, build the snapshot on the new head
        and try again (``retry``); a branch deleted meanwhile is never recreated."""
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            snapshot = snapshot_on(head)
            self.backend.put(snapshot_key(snapshot.id), snapshot.to_bytes())
            try:
                self.backend.swap_ref(BRANCH_PREFIX + branch, head, snapshot.id)
            except RefConflictError as e:
                if not retry or e.actual is None:  # never recreate a branch deleted meanwhile
                    raise
                head = e.actual
                continue
            self._snapshots[snapshot.id] = snapshot
            return snapshot
        raise RefConflictError(BRANCH_PREFIX + branch, head, self.backend.read_ref(BRANCH_PREFIX + branch))

    def _sync_index(self) -> None:
        """With the writer lock held: rebuild the index if a garbage collection (here or
        on another machine) ran since it was last brought up to date, so no commit
        dedups against a chunk that GC deleted."""
        generation = self.backend.read_ref(GC_GENERATION_REF)
        if generation != self._index.generation():
            self._index.clear()
            self._index_packs()
            self._index.set_generation(generation)

    def _store_arrays(
        self, staged: Sequence[StagedArray], base: HotSnapshot | None, rules: Mapping[str, ParamRule], step: int | None
    ) -> tuple[list[TensorEntry], CommitStats]:
        """Chunk, hash, dedup, encode (predicted from ``base`` where that is smaller)
        and pack every staged array; index the new chunks."""
        size = self.config.chunk_size
        entries: list[TensorEntry] = []
        first: dict[bytes, tuple[StagedArray, int]] = {}  # chunk id -> (array, chunk number) of its first occurrence
        for array in staged:
            ids = tuple(digest(array.data[o : o + size].data) for o in range(0, array.data.size, size))
            for number, chunk_id in enumerate(ids):
                first.setdefault(chunk_id, (array, number))
            entries.append(TensorEntry(array.path, array.kind, array.dtype, array.shape, size, ids))
        missing = self._index.missing(first)
        new = [cid for cid in first if cid in missing]
        planner = EncodePlanner(self._index, size, self.config.max_chain, staged, entries, base, rules, step, missing)
        waves: dict[int, list[bytes]] = {}
        for chunk_id in new:
            waves.setdefault(planner.wave(*first[chunk_id]), []).append(chunk_id)
        locations, stored = self._write_packs([waves[w] for w in sorted(waves)], first, planner)
        self._index.put_many(locations)
        raw_total = sum(a.data.size for a in staged)
        stats = CommitStats(raw_total, sum(len(e.chunks) for e in entries), len(new),
                            sum(chunk_view(*first[c], size).size for c in new), stored)  # fmt: skip
        return entries, stats

    def _write_packs(
        self, waves: list[list[bytes]], first: Mapping[bytes, tuple[StagedArray, int]], planner: EncodePlanner
    ) -> tuple[dict[bytes, ChunkLocation], int]:
        """Encode new chunks wave by wave in the thread pool (bounded in flight; a wave
        only predicts from chunks of earlier waves) and write packs."""
        level = self.config.compression_level
        size = self.config.chunk_size
        builder = PackBuilder()
        locations: dict[bytes, ChunkLocation] = {}
        stored = 0

        def flush() -> None:
            pack_id, data, locs = builder.finish()
            self.backend.put(pack_key(pack_id), data)
            locations.update(locs)

        max_in_flight = 4 * self._workers
        for wave in waves:
            pending: deque[tuple[bytes, Future[EncodedObject]]] = deque()
            todo = iter(wave)
            while True:
                for chunk_id in todo:
                    array, number = first[chunk_id]
                    candidates = planner.candidates(chunk_id, array, number)
                    pending.append((chunk_id, self._pool.submit(
                        encode_object, chunk_view(array, number, size), array.itemsize, is_floating(array.dtype), level, candidates
                    )))  # fmt: skip
                    if len(pending) >= max_in_flight:
                        break
                if not pending:
                    break
                chunk_id, future = pending.popleft()
                obj = future.result()
                depth = planner.encoded(chunk_id, obj.deps)
                builder.add(chunk_id, obj.codec, obj.data, depth, obj.deps)
                stored += len(obj.data)
                if builder.size >= PACK_TARGET_SIZE:
                    flush()
        if len(builder):
            flush()
        return locations, stored

    # -- read ----------------------------------------------------------------
    def _locate(self, chunk_id: bytes) -> ChunkLocation | None:
        location = self._index.get(chunk_id)
        if location is None:  # the index may be behind packs written elsewhere
            self.rebuild_index()
            location = self._index.get(chunk_id)
        return location

    def read_arrays(self, snapshot: Snapshot, entries: list[TensorEntry]) -> list[torch.Tensor | np.ndarray]:
        """Read and verify the given tensors of ``snapshot`` as CPU values (see ``ChunkReader``).

        Raises ``IntegrityError`` naming the snapshot, the state key and the
        object at fault if any chunk (or a chunk it depends on) cannot be read.
        """
        return [_as_value(b, e) for b, e in zip(self._read_buffers(snapshot, entries), entries)]

    def _read_buffers(self, snapshot: Snapshot, entries: list[TensorEntry]) -> list[np.ndarray]:
        """``read_arrays``, as one flat uint8 buffer per entry."""
        return self._read_byte_ranges(snapshot, [(e, 0, e.nbytes) for e in entries])

    def read_bytes(self, snapshot: Snapshot, entry: TensorEntry, start: int, end: int) -> np.ndarray:
        """Bytes ``[start, end)`` of one tensor of ``snapshot``, reading (and verifying)
        only the chunks that cover them."""
        if not 0 <= start <= end <= entry.nbytes:
            raise InvalidInputError(f"byte range [{start}, {end}) is outside {entry.path!r} ({entry.nbytes} bytes)")
        return self._read_byte_ranges(snapshot, [(entry, start, end)])[0]

    def _read_byte_ranges(self, snapshot: Snapshot, ranges: list[tuple[TensorEntry, int, int]]) -> list[np.ndarray]:
        buffers = [np.empty(end - start, dtype=np.uint8) for _, start, end in ranges]
        targets: dict[bytes, list[tuple[np.ndarray, TensorEntry, int, int, int]]] = {}
        for buffer, (entry, start, end) in zip(buffers, ranges):
            for chunk_id, offset, length in entry.spans():
                if offset < end and offset + length > start:
                    targets.setdefault(chunk_id, []).append((buffer, entry, offset - start, length, end - start))

        def place(chunk_id: bytes, raw: bytes) -> None:
            data = np.frombuffer(raw, dtype=np.uint8)
            for buffer, entry, at, length, size in targets[chunk_id]:
                if len(raw) != length:
                    raise IntegrityError(
                        f"snapshot {snapshot.short_id}, state key {entry.path!r}: "
                        f"chunk {chunk_id.hex()} has {len(raw)} bytes, manifest expects {length}"
                    )
                lo, hi = max(at, 0), min(at + length, size)  # the part of the chunk inside the range
                buffer[lo:hi] = data[lo - at : hi - at]

        errors = self._reader.read(targets, place)
        if errors:
            chunk_id, error = next(iter(errors.items()))
            raise IntegrityError(f"snapshot {snapshot.short_id}, state key {targets[chunk_id][0][1].path!r}: {error}") from error
        return buffers

    def manifest(self, snapshot: Snapshot) -> Manifest:
        """The (verified) manifest of ``snapshot``."""
        try:
            return self._manifest_by_id(snapshot.manifest)
        except IntegrityError as e:
            raise IntegrityError(f"snapshot {snapshot.short_id}: {e}") from e

    def restore(self, state: TrainingState, revision: str = "main") -> Snapshot:
        """Load the snapshot at ``revision`` into the live objects of ``state``, in place.

        Everything is validated and read (and digest-checked) before anything is
        modified: a mismatch raises ``StateMismatchError`` listing every
        offending key, damaged data raises ``IntegrityError``; in both cases the
        live state is untouched. A snapshot in the hot tier is copied from
        memory; one read from storage enters the hot tier (the base of the next
        commit's deltas). Returns the restored snapshot.
        """
        self._writer.flush()  # pending commits first: the revision may name them, and the hot tier is shared
        snap = self.snapshot(revision)
        manifest = self.manifest(snap)
        problems = state.problems(decode_tree(manifest.tree, lambda i: manifest.tensors[i]))
        if problems:
            raise StateMismatchError(
                f"snapshot {snap.short_id} ({revision}) does not fit the live training state; nothing was modified:",
                problems,
            )
        entries = list(manifest.tensors)
        copies = self._hot.copy_out(snap.id, [e.path for e in entries])
        from_storage = copies is None
        if copies is None:
            buffers = self._read_buffers(snap, entries)
            # the buffers become hot; load_state_dict may keep what it is given, so it gets copies
            copies = [b.copy() for b in buffers] if self._hot.max_snapshots else buffers
        tree = decode_tree(manifest.tree, lambda i: _as_value(copies[i], entries[i]))
        state.load(tree)
        if from_storage:
            staged = {e.path: StagedArray(e.path, e.kind, e.dtype, e.shape, e.itemsize, b) for e, b in zip(entries, buffers)}
            rules = parameter_rules(tree, state.optimizer_layouts())
            self._hot.put(HotSnapshot(snap.id, staged, {e.path: e for e in entries}, rules, snap.step))
        return snap

    def load(self, revision: str = "main") -> SnapshotView:
        """A read-only view of a snapshot without any model: tensors by path, read lazily."""
        snap = self.snapshot(revision)
        return SnapshotView(snap, self.manifest(snap), self.read_arrays, self.read_bytes)

    # -- snapshots and revisions ----------------------------------------------
    def snapshot(self, revision: str) -> Snapshot:
        """The snapshot a revision names: branch, tag, snapshot id (or unique prefix of
        at least 6 hex digits), each optionally followed by ``@STEP`` to pick the
        ancestor (first parents) committed at that step."""
        snapshot_id = self.resolve(revision)
        if snapshot_id not in self._snapshots:
            try:
                data = self.backend.get(snapshot_key(snapshot_id))
            except ObjectNotFoundError:
                raise RevisionNotFoundError(f"snapshot {snapshot_id} does not exist") from None
            self._snapshots[snapshot_id] = Snapshot.from_bytes(snapshot_id, data)
        return self._snapshots[snapshot_id]

    def resolve(self, revision: str) -> str:
        """The snapshot id a revision names (see ``snapshot``)."""
        if not isinstance(revision, str) or not revision:
            raise InvalidInputError(f"revision must be a non-empty string, got {revision!r}")
        match = _STEP_REVISION.fullmatch(revision)
        if match is None:
            return self._resolve_name(revision)
        base, step = match.group(1), int(match.group(2))
        for snap in self._first_parents(self._resolve_name(base)):
            if snap.step == step:
                return snap.id
        raise RevisionNotFoundError(f"no snapshot at step {step} in the history of {base!r}")

    def _resolve_name(self, name: str) -> str:
        for prefix in (BRANCH_PREFIX, TAG_PREFIX):
            try:
                target = self.backend.read_ref(prefix + check_ref_name(name))
            except InvalidInputError:
                break
            if target is not None:
                return target
        if ID_HEX.fullmatch(name):
            if self.backend.exists(snapshot_key(name)):
                return name
        elif re.fullmatch(r"[0-9a-f]{6,31}", name):
            matches = self.backend.list(snapshot_key(name))
            if len(matches) > 1:
                raise AmbiguousRevisionError(f"snapshot id prefix {name!r} matches {len(matches)} snapshots")
            if matches:
                return matches[0].rsplit("/", 1)[1]
        known = ", ".join(sorted(self.branches())[:10]) or "none"
        raise RevisionNotFoundError(f"unknown revision {name!r}: no branch, tag or snapshot id matches (branches: {known})")

    def _stored_snapshot(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot with this id, or None if it was expired by garbage collection."""
        try:
            return self.snapshot(snapshot_id)
        except RevisionNotFoundError:
            return None

    def _first_parents(self, snapshot_id: str) -> Iterator[Snapshot]:
        """The snapshot and its first-parent ancestors, up to the first expired one."""
        snap = self.snapshot(snapshot_id)
        while snap is not None:
            yield snap
            snap = self._stored_snapshot(snap.parents[0]) if snap.parents else None

    def log(self, *revisions: str, limit: int | None = None) -> list[Snapshot]:
        """Snapshots reachable from the revisions (default ``main``; all parents), newest
        first. Snapshots expired by garbage collection end their line of history."""
        heap: list[tuple[float, str]] = []
        seen: set[str] = set()

        def push(snap: Snapshot | None) -> None:
            if snap is not None and snap.id not in seen:
                seen.add(snap.id)
                heapq.heappush(heap, (-snap.time, snap.id))

        for revision in revisions or ("main",):
            push(self.snapshot(revision))
        out: list[Snapshot] = []
        while heap and (limit is None or len(out) < limit):
            snap = self.snapshot(heapq.heappop(heap)[1])
            out.append(snap)
            for parent in snap.parents:
                if parent not in seen:
                    push(self._stored_snapshot(parent))
        return out

    def snapshot_ids(self) -> list[str]:
        """Ids of every snapshot stored, reachable or not."""
        return [key.rsplit("/", 1)[1] for key in self.backend.list("snapshots/")]

    # -- refs ------------------------------------------------------------------
    def branches(self) -> dict[str, str]:
        """Branch name -> snapshot id."""
        return {k.removeprefix(BRANCH_PREFIX): v for k, v in self.backend.list_refs(BRANCH_PREFIX).items()}

    def tags(self) -> dict[str, str]:
        """Tag name -> snapshot id."""
        return {k.removeprefix(TAG_PREFIX): v for k, v in self.backend.list_refs(TAG_PREFIX).items()}

    def _create_ref(self, prefix: str, name: str, revision: str, kind: str) -> Snapshot:
        check_ref_name(name, kind)
        other = TAG_PREFIX if prefix == BRANCH_PREFIX else BRANCH_PREFIX
        if self.backend.read_ref(other + name) is not None:
            raise AlreadyExistsError(f"{name!r} is already a {'tag' if other == TAG_PREFIX else 'branch'}")
        snap = self.snapshot(revision)
        try:
            self.backend.swap_ref(prefix + name, None, snap.id)
        except RefConflictError:
            raise AlreadyExistsError(f"{kind} {name!r} exists already") from None
        return snap

    def create_branch(self, name: str, at: str = "main") -> Snapshot:
        """Start branch ``name`` at the snapshot ``at`` names. Metadata only: no data is copied."""
        return self._create_ref(BRANCH_PREFIX, name, at, "branch")

    def create_tag(self, name: str, at: str = "main") -> Snapshot:
        """Give the snapshot ``at`` names a fixed name."""
        return self._create_ref(TAG_PREFIX, name, at, "tag")

    def _delete_ref(self, prefix: str, name: str, kind: str) -> None:
        check_ref_name(name, kind)
        current = self.backend.read_ref(prefix + name)
        if current is None:
            raise RevisionNotFoundError(f"no {kind} named {name!r}")
        self.backend.swap_ref(prefix + name, current, None)

    def delete_branch(self, name: str) -> None:
        """Remove a branch ref (its snapshots stay until garbage collection)."""
        self._delete_ref(BRANCH_PREFIX, name, "branch")

    def delete_tag(self, name: str) -> None:
        """Remove a tag ref."""
        self._delete_ref(TAG_PREFIX, name, "tag")

    # -- maintenance -------------------------------------------------------------
    def stats(self) -> RepositoryStats:
        """Raw versus stored bytes over all snapshots (reads every snapshot record)."""
        snaps = [self.snapshot(i) for i in self.snapshot_ids()]
        packs = self.backend.list("packs/")
        stored = sum(self.backend.size(k) for k in packs + self.backend.list("manifests/") + self.backend.list("snapshots/"))
        return RepositoryStats(
            snapshots=len(snaps),
            packs=len(packs),
            raw_bytes=sum(s.stats.raw_bytes for s in snaps),
            unique_raw_bytes=sum(s.stats.new_raw_bytes for s in snaps),
            stored_bytes=stored,
        )

    def rebuild_index(self) -> int:
        """Re-read every pack footer into the chunk index; returns the number of packs indexed.

        A pack whose footer is damaged is skipped with a warning on the ``qckpt``
        logger: its chunks then read as missing, naming the snapshot that needs them.
        """
        with self.backend.lock(exclusive=False):
            return self._index_packs()

    def _index_packs(self) -> int:
        """``rebuild_index`` for callers that hold the writer lock already."""
        def footer(pack_id: str) -> dict[bytes, ChunkLocation] | None:
            try:
                return self._pack_contents(pack_id)
            except IntegrityError as e:
                _log.warning("skipping damaged pack %s while rebuilding the index: %s", pack_id, e)
                return None

        with self._rebuild_lock:
            found = [f for f in self._pool.map(footer, self._pack_ids()) if f is not None]
            for contents in found:
                self._index.put_many(contents)
        return len(found)

    def gc(
        self,
        policy: RetentionPolicy | None = None,
        *,
        dry_run: bool = False,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> GcReport:
        """Expire snapshots by ``policy`` (default: keep everything reachable from a
        branch or tag) and delete every object no kept snapshot needs.

        Holds the exclusive writer lock: concurrent commits wait, and none can
        reference an object while it is being deleted. ``progress(stage, done, total)``
        is called as work proceeds.
        """
        return collect_garbage(self, policy or RetentionPolicy(), dry_run=dry_run, progress=progress)

    def join(
        self,
        target: str,
        candidates: list[str],
        *,
        metric: str | Callable[[Snapshot], float] = "loss",
        mode: str = "min",
        message: str = "",
        allow_lossy: bool = False,
    ) -> Snapshot:
        """Pick the best candidate revision and move branch ``target`` to it.

        Candidates are scored by ``metric`` (a metric name recorded at commit, or
        a callable on the ``Snapshot``); ``mode`` is ``min`` or ``max``; NaN
        scores lose. Records a snapshot with the winner's manifest (no data is
        copied) whose parents are ``target``'s head and every candidate, and
        whose ``annotations["join"]`` keeps each candidate's step and metrics.
        A lossy-tier winner is refused for ``main`` unless ``allow_lossy``.
        """
        return pick_best(self, target, candidates, metric, mode, message, allow_lossy)

    def average(
        self,
        revisions: list[str],
        *,
        branch: str,
        weights: list[float] | None = None,
        message: str = "",
        allow_lossy: bool = False,
    ) -> Snapshot:
        """Commit the element-wise (weighted) average of snapshots to ``branch``.

        Tensors must match in path, dtype and shape (``StateMismatchError``
        otherwise). Every floating-point tensor is averaged in float64 and cast
        back, optimizer moments included; tensors identical in all snapshots,
        non-floating tensors and all plain values (step counters, RNG and sampler
        states) are taken unchanged from the first revision. Averaging lossy-tier
        snapshots into ``main`` is refused unless ``allow_lossy``.
        """
        return average(self, revisions, branch, weights, message, allow_lossy)

    def diff(self, a: str, b: str) -> list[TensorDiff]:
        """Per-tensor comparison of two revisions (see ``TensorDiff``)."""
        return diff_snapshots(self, self.snapshot(a), self.snapshot(b))

    def export_zarr(
        self, revision: str, dest: str | os.PathLike[str], progress: Callable[[str, int, int], None] | None = None
    ) -> int:
        """Write a snapshot to a new zarr v3 directory readable without qckpt; returns the array count."""
        return export_zarr(self, revision, Path(dest), progress)

    def zarr_store(self, revision: str) -> SnapshotStore:
        """The snapshot at ``revision`` as a read-only zarr v3 store (``zarr.open_group(store,
        mode="r")``): arrays at state paths, chunks read lazily from this repository."""
        return SnapshotStore(self, self.snapshot(revision))

    def fsck(self, progress: Callable[[str, int, int], None] | None = None) -> FsckReport:
        """Verify every ref, reachable snapshot, manifest, chunk digest and pack footer.

        Never raises for damage: returns a report naming each damaged thing and
        the snapshots and state keys it affects (``report.ok`` is False then).
        """
        return check_repository(self, progress)

    # -- internals shared with maintenance modules ---------------------------------
    def _pack_ids(self) -> list[str]:
        return [k.removeprefix("packs/").removesuffix(".pack") for k in self.backend.list("packs/")]

    def _pack_contents(self, pack_id: str) -> dict[bytes, ChunkLocation]:
        """Chunk locations listed in a pack's footer (``IntegrityError`` if damaged)."""
        key = pack_key(pack_id)
        size = self.backend.size(key)
        trailer = self.backend.get_range(key, max(0, size - TRAILER_SIZE), TRAILER_SIZE)
        span = footer_span(pack_id, trailer, size)
        return read_pack_footer(pack_id, self.backend.get_range(key, span.offset, span.length), span)

    def _manifest_by_id(self, manifest_id: str) -> Manifest:
        try:
            data = self.backend.get(manifest_key(manifest_id))
        except ObjectNotFoundError:
            raise IntegrityError(f"manifest {manifest_id} is missing") from None
        return Manifest.from_bytes(manifest_id, data)


@dataclass(frozen=True)
class _CommitJob:
    """A staged commit waiting for the writer thread."""

    encoded: Any
    staged: list[StagedArray]
    rules: dict[str, ParamRule]
    branch: str
    step: int | None
    metrics: dict[str, float]
    message: str
    on_conflict: str
    lossy: LossyTier | None


def _as_value(buffer: np.ndarray, entry: TensorEntry) -> torch.Tensor | np.ndarray:
    if entry.kind == "ndarray":
        return buffer.view(numpy_dtype(entry.dtype)).reshape(entry.shape)
    if buffer.size == 0:  # from_numpy gives empty tensors stride 0, which cannot be re-viewed
        return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    return torch.from_numpy(buffer).view(torch_dtype(entry.dtype)).reshape(entry.shape)


