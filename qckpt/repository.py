"""The repository facade: what users call. Commits, restores, loads, refs, maintenance.

``Repository`` holds a ``Store`` (the storage engine and its one write
transaction, ``qckpt.store``), the hot tier and the asynchronous commit writer
(``qckpt.commit``), and hands maintenance to ``qckpt.ops``. It adds no storage
logic of its own.

Threads. Commits run on the repository's writer thread, in submission order;
``commit_async`` returns once the state is staged. One rule for everything
else: **every operation that reads refs or snapshots first waits for the
commits already submitted** (and raises a background failure not reported
yet), so it never sees a head older than the caller's own commits. The hot
tier changes only on the writer thread (commits, and restores, which hand
their snapshot to it), so a buffer in use as a delta base is never recycled
under a commit. Methods may be called from several threads; capture and
restore of one ``TrainingState`` belong to its training thread.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import signal
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qckpt.backends import Backend, LocalBackend, RetryingBackend, S3Backend, parse_s3_uri
from qckpt.commit.arrays import write_arrays
from qckpt.commit.encoding import EncodingChoices
from qckpt.commit.hot import HotSnapshot, HotTier
from qckpt.commit.lossy import LossyTier, check_main_line, quantize
from qckpt.commit.predict import ParamRule, parameter_rules
from qckpt.commit.staging import StagedArray, stage
from qckpt.commit.warm import WarmCadence
from qckpt.commit.writer import CommitHandle, CommitWriter
from qckpt.errors import (
    AlreadyExistsError,
    DivergedError,
    InvalidInputError,
    RevisionNotFoundError,
    StateMismatchError,
    UnsupportedValueError,
)
from qckpt.format.records import LOSSY_ANNOTATION, Manifest, RefLogEntry, Snapshot, TensorEntry
from qckpt.format.tensors import flat_elements, torch_dtype_name
from qckpt.format.tree import encode_tree, is_sharded, join_path
from qckpt.ops.destination import local_path
from qckpt.ops.diff import TensorDiff, diff_snapshots
from qckpt.ops.file_export import export_file, format_for
from qckpt.ops.fsck import FsckReport, check_repository
from qckpt.ops.gc import GcReport, RetentionPolicy, collect_garbage
from qckpt.ops.join import average, pick_best
from qckpt.ops.log import history
from qckpt.ops.usage import BranchUsage, branch_usage
from qckpt.ops.view import SnapshotView
from qckpt.ops.zarr_export import export_zarr
from qckpt.ops.zarr_store import SnapshotStore
from qckpt.state import Lineage, TrainingState
from qckpt.store.layout import BRANCH_PREFIX, TAG_PREFIX
from qckpt.store.refs import check_ref_name
from qckpt.store.store import (
    ClosedPart,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_MAX_CHAIN,
    RepositoryConfig,
    Store,
    Transaction,
    as_value,
    is_whole,
    new_config,
)

_log = logging.getLogger("qckpt")
DEFAULT_HOT_SNAPSHOTS = 2
DEFAULT_MAX_PENDING = 2
_IN_PLACE_MIN_BYTES = 1 << 16  # restores copy optimizer tensors at least this large into the live ones
DEFAULT_WARM_INTERVAL_REMOTE = 60.0  # seconds between a branch's warm copies on remote storage (local: every commit)


@dataclass(frozen=True)
class RepositoryStats:
    """Storage accounting over every snapshot in the repository."""

    snapshots: int
    packs: int
    raw_bytes: int  # tensor bytes summed over all snapshots, as if each were saved in full
    unique_raw_bytes: int  # raw bytes of distinct chunks (after dedup)
    stored_bytes: int  # bytes in packs, manifests and snapshots: the history
    warm_bytes: int = 0  # bytes in warm copies of branch heads (a cache, replaced as heads move)

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
    if not isinstance(location, (str, os.PathLike)):
        raise InvalidInputError(f"a repository location is a path, a file:// or s3:// URI or a Backend, got {location!r}")
    text = os.fspath(location)
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_uri(text)
        return RetryingBackend(S3Backend(bucket, prefix, endpoint_url=endpoint_url))
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        raise InvalidInputError(f"unsupported repository URI {text!r} (use a path, file:// or s3://)")
    return LocalBackend(Path(text))


@dataclass(frozen=True)
class _CommitJob:
    """A staged commit waiting for the writer thread."""

    encoded: Any
    staged: list[StagedArray]
    rules: dict[str, ParamRule]
    notes: tuple[str, ...]
    branch: str
    step: int | None
    metrics: dict[str, float]
    message: str
    on_conflict: str
    lossy: LossyTier | None
    lineage: Lineage | None  # where the committed state came from (TrainingState only)
    warm: bool  # whether the new head gets a warm copy (when the cadence says one is due)


def _parent_on(job: _CommitJob, head: str | None) -> str | None:
    """The parent of a commit on ``head``: the snapshot the live state came from (see
    ``Repository.commit``)."""
    origin, restored = job.lineage.resolve() if job.lineage is not None else (None, False)
    if origin is None:
        return head
    if head is None:  # a new branch, or one deleted under a live run: continue from where the state came from
        return origin
    if restored and head != origin:
        raise DivergedError(
            f"branch {job.branch!r} is at {head[:12]}, but this state was restored from {origin[:12]}: committing "
            f"would move the branch off its history. Move it explicitly with repo.reset({job.branch!r}, "
            f"{origin[:12]!r}) (recorded in the ref log), or commit to another branch."
        )
    return head


class Repository:
    """A qckpt repository on one backend. Create with ``init``, reopen with ``open``.

    Several processes may share a repository: ref updates are compare-and-swap,
    so a lost race re-parents the commit or raises ``RefConflictError``, never
    silently drops one. Use as a context manager or call ``close``. Threads:
    see the module docstring.

    The hot tier keeps the tensors of the last ``hot_snapshots`` committed or
    restored snapshots in host memory (at most ``hot_bytes`` beyond the newest,
    when given): a commit on top of a hot snapshot is encoded as deltas and
    optimizer-aware predictions against it. ``hot_snapshots=0`` disables both.
    """

    def __init__(
        self,
        store: Store,
        *,
        hot_snapshots: int = DEFAULT_HOT_SNAPSHOTS,
        hot_bytes: int | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        warm: bool = True,
        warm_interval: float | None = None,
    ) -> None:
        """Use ``init`` or ``open``."""
        self._uri = store.backend.uri
        self._store = store
        self._hot = HotTier(hot_snapshots, hot_bytes)
        self._writer = CommitWriter(max_pending, f"qckpt-writer {store.backend.uri}")
        self._choices = EncodingChoices()  # the writer thread's
        if warm_interval is None:
            warm_interval = DEFAULT_WARM_INTERVAL_REMOTE if store.backend.capabilities.remote else 0.0
        self._warm = WarmCadence(store, self._hot, warm_interval) if warm else None
        self._sharded_writers: dict[str, Any] = {}  # per branch: a sharded state's DCP writer (its delta bases)
        self._compacting: weakref.WeakSet[Any] = weakref.WeakSet()  # DCP writers on this repository: flush waits for them

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
        warm: bool = True,
        warm_interval: float | None = None,
        exist_ok: bool = False,
    ) -> Repository:
        """Create an empty repository at ``location``: a path, ``file://`` or
        ``s3://bucket/prefix`` URI, or a ``Backend``.

        Raises ``AlreadyExistsError`` if one exists there, unless ``exist_ok``:
        then that one is opened (its own settings apply). ``chunk_size`` must be a
        positive multiple of 64 bytes, ``compression_level`` a zstd level (1-19).
        ``max_chain`` (1-255) bounds dependency chains: restoring any chunk decodes
        at most that many objects along one chain; 1 stores every chunk on its own.
        ``endpoint_url`` selects an S3-compatible server (default: boto3's
        configuration, including ``AWS_ENDPOINT_URL``); ``cache_dir`` is where
        remote repositories keep their local chunk-index cache. ``hot_snapshots``
        and ``hot_bytes`` size the hot tier, ``max_pending`` bounds asynchronous
        commits in flight (see the class and ``commit_async``).
        """
        _check_tiers(hot_snapshots, hot_bytes, max_pending, warm_interval)
        config = new_config(chunk_size, compression_level, max_chain)
        backend = _backend_for(location, endpoint_url)
        local_dir = backend.capabilities.local_dir
        if local_dir is not None and local_dir.exists() and not local_dir.is_dir():
            raise InvalidInputError(f"{local_dir} exists and is not a directory")
        try:
            store = Store.create(backend, config, cache_dir)
        except AlreadyExistsError:
            if not exist_ok:
                raise
            store = Store.open(backend, cache_dir)
        return cls(store, hot_snapshots=hot_snapshots, hot_bytes=hot_bytes, max_pending=max_pending, warm=warm, warm_interval=warm_interval)

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
        warm: bool = True,
        warm_interval: float | None = None,
    ) -> Repository:
        """Open an existing repository (see ``init`` for the arguments);
        ``RepositoryNotFoundError`` if there is none."""
        _check_tiers(hot_snapshots, hot_bytes, max_pending, warm_interval)
        store = Store.open(_backend_for(location, endpoint_url), cache_dir)
        return cls(store, hot_snapshots=hot_snapshots, hot_bytes=hot_bytes, max_pending=max_pending, warm=warm, warm_interval=warm_interval)

    def close(self) -> None:
        """Write every pending commit, finish background work, release the index,
        the backend and the hot tier's memory. Raises a background commit failure
        not reported yet. Closing again does nothing; any other call on a closed
        repository raises ``RepositoryClosedError``."""
        if self._closed:
            return
        try:
            try:
                try:
                    self.flush()
                finally:
                    self._writer.close()
                    for writer in self._sharded_writers.values():
                        writer.close()
            finally:
                self._store.close()
        finally:
            closed = ClosedPart(self._uri)
            self._store = self._writer = self._hot = self._warm = closed  # type: ignore[assignment]
            self._sharded_writers = {}

    @property
    def _closed(self) -> bool:
        return isinstance(self._store, ClosedPart)

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Repository({self._uri!r}{', closed' if self._closed else ''})"

    @property
    def backend(self) -> Backend:
        """The storage backend."""
        return self._store.backend

    @property
    def config(self) -> RepositoryConfig:
        """The repository's settings (format version, chunk size...)."""
        return self._store.config

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
        warm: bool = True,
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

        Lineage: a ``TrainingState``'s commit has as parent the snapshot the
        state came from. After ``restore``, that is the restored snapshot: the
        commit starts a new branch from it, or extends a branch whose head it
        is; a branch that is elsewhere raises ``DivergedError`` (move it with
        ``reset`` first: nothing moves a branch off its history by accident).
        Otherwise the parent is the branch head, or, for a branch that does
        not exist (new, or deleted under the running job), the state's
        previous commit. Plain trees are committed on the branch head.

        ``lossy=LossyTier(mantissa_bits)`` stores floats rounded to that
        precision (opt-in, for exploratory branches; refused on ``main`` unless
        ``allow_main``): the snapshot then holds the rounded values, bit-exact,
        and records ``annotations["lossy"]``.

        ``warm=False``: this head gets no warm copy (see ``init``), and the branch's
        previous copy written by this repository is deleted; for branches that are rarely restored,
        such as a light cone's explored futures, whose copies would cost a raw
        state each, written and at rest. Restoring such a head reads the packs.

        A state with sharded (DTensor: FSDP2, tensor-parallel) modules is committed
        collectively: call ``commit`` on every rank, as ``dcp.save``; it goes
        through ``torch.distributed.checkpoint`` with
        ``qckpt.distributed.QckptWriter`` (every rank writes its shards, one
        snapshot is published on the branch head) and returns that snapshot on
        every rank. ``on_conflict="raise"`` and ``lossy`` do not apply to it.
        """
        if isinstance(state, TrainingState) and _sharded_component(state) is not None:
            return self._commit_sharded(state, branch, step, metrics, message, on_conflict, lossy)
        return self.commit_async(
            state, branch=branch, step=step, metrics=metrics, message=message, on_conflict=on_conflict, lossy=lossy,
            warm=warm,
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
        warm: bool = True,
    ) -> CommitHandle:
        """Stage ``state`` and commit it in the background (arguments as ``commit``).

        Returns once the tensors are copied into host memory the repository owns
        (pinned memory and one synchronisation for CUDA tensors): training may
        change them right away. Validation errors are raised here. Chunking,
        encoding, writing and the ref update run on the repository's writer
        thread, in submission order; at most ``max_pending`` commits are in
        flight (this call blocks while that many are). A background failure is
        raised by the returned handle's ``wait()`` and by the next operation
        (see the module docstring); commits queued behind it are not written
        (``CommitAbortedError``), so the branch stays at the last good snapshot.
        Sharded states are committed with ``commit`` (a collective).
        """
        if isinstance(state, TrainingState) and (name := _sharded_component(state)) is not None:
            raise UnsupportedValueError(f"component {name!r} is sharded (DTensor parameters): commit sharded states with "
                                        "Repository.commit on every rank, or dcp.async_save with QckptWriter")  # fmt: skip
        check_ref_name(branch)
        if on_conflict not in ("retry", "raise"):
            raise InvalidInputError(f"on_conflict must be 'retry' or 'raise', got {on_conflict!r}")
        if lossy is not None:
            if not isinstance(lossy, LossyTier):
                raise InvalidInputError(f"lossy must be a LossyTier or None, got {lossy!r}")
            check_main_line(branch, lossy.annotation(), lossy.allow_main, "this commit")
        if not isinstance(warm, bool):
            raise InvalidInputError(f"warm must be True or False, got {warm!r}")
        rules: dict[str, ParamRule] = {}
        notes: tuple[str, ...] = ()
        lineage = None
        if isinstance(state, TrainingState):
            if state.lineage is not None and state.lineage.repository_id == self.config.repository_id:
                lineage = state.lineage
            layouts = state.optimizer_layouts()
            tree: Any = state.capture(layouts)
            step = state.step if step is None else step
            rules = parameter_rules(tree, layouts)
            notes = tuple(layout.note for layout in layouts if layout.note)
        else:
            tree = state
        metrics = check_metrics(metrics)
        _check_step_and_message(step, message)
        encoded, leaves = encode_tree(tree)
        job = _CommitJob(
            encoded, stage(leaves, self._hot.take), rules, notes, branch, step, metrics, message, on_conflict, lossy, lineage,
            warm,
        )
        handle = self._writer.submit(lambda: self._write_commit(job))
        if isinstance(state, TrainingState):
            state.lineage = lineage.after_commit(handle) if lineage else Lineage(self.config.repository_id, handle, False)
        return handle

    def flush(self) -> None:
        """Wait until every commit submitted so far is durable (raises a background
        failure not reported yet), and write the warm copies still due (see ``init``);
        ``QckptWriter``s on this repository (sharded commits: durable already) finish
        their compactions and warm parts (raising a failed one)."""
        self._writer.flush()
        if self._warm is not None and self._warm.pending and not self._writer.closed:
            self._writer.submit(self._warm.catch_up).wait()
        for writer in list(self._compacting):
            writer.wait()

    def flush_on_signal(self, signum: int = signal.SIGTERM) -> None:
        """On ``signum`` (SIGTERM: what schedulers send before preempting a job), write
        every submitted commit and the warm copies still due, then hand the signal
        to the handler that was there before (by default: the process ends, with
        the signal as its exit status). Call from the main thread
        (``InvalidInputError`` otherwise, or for a signal that cannot be handled)."""
        try:
            previous = signal.getsignal(signum)
        except ValueError as e:
            raise InvalidInputError(f"cannot handle signal {signum!r}: {e}") from None

        def handler(received: int, frame: Any) -> None:
            try:
                if not self._closed:  # closed: everything was written then
                    self.flush()
            finally:
                signal.signal(received, previous if previous is not None else signal.SIG_DFL)
                if callable(previous):
                    previous(received, frame)
                elif previous == signal.SIG_DFL:
                    os.kill(os.getpid(), received)

        try:
            signal.signal(signum, handler)
        except (ValueError, OSError) as e:  # not the main thread, or a signal that cannot be caught (SIGKILL)
            raise InvalidInputError(f"cannot handle signal {signum!r}: {e}") from None

    def _write_commit(self, job: _CommitJob) -> Snapshot:
        """The background half of a commit (runs on the writer thread)."""
        staged = quantize(job.staged, job.lossy) if job.lossy is not None else job.staged
        written: dict[str, Any] = {}

        def build(txn: Transaction) -> Callable[[str | None], Snapshot]:
            base = _parent_on(job, txn.head)  # a diverged branch fails before anything is written
            tensors, stats = write_arrays(txn, staged, self._hot.get(base), job.rules, job.step, job.notes, self._choices)
            manifest_id = txn.put_manifest(Manifest(job.encoded, tuple(tensors)))
            written["tensors"] = tensors
            annotations = {LOSSY_ANNOTATION: job.lossy.annotation()} if job.lossy else {}
            def snapshot_on(head: str | None) -> Snapshot:
                parent = _parent_on(job, head)
                return Snapshot.new(
                    manifest=manifest_id, parents=(parent,) if parent else (), step=job.step, message=job.message,
                    metrics=job.metrics, stats=stats, annotations=annotations,
                )  # fmt: skip

            return snapshot_on

        snapshot = self._store.transaction(job.branch, build, cause="commit", on_conflict=job.on_conflict)
        arrays = {a.path: a for a in staged}
        self._hot.put(HotSnapshot(snapshot.id, arrays, {t.path: t for t in written["tensors"]}, job.rules, job.step))
        if self._warm is not None:
            try:
                self._warm.committed(job.branch, snapshot, written["tensors"], {a.path: a.data for a in staged}, job.warm)
            except Exception as e:  # the commit is durable: its handle succeeds; the next operation raises this
                self._writer.report_later(e)
        return snapshot

    # -- read ----------------------------------------------------------------
    def _commit_sharded(self, state: TrainingState, branch: str, step: int | None, metrics: Mapping[str, float] | None,
                        message: str, on_conflict: str, lossy: LossyTier | None) -> Snapshot:  # fmt: skip
        """``commit`` of a sharded state, on every rank (see ``commit``)."""
        from qckpt.distributed import QckptWriter  # torch.distributed.checkpoint, imported when needed

        if on_conflict != "retry" or lossy is not None:
            raise UnsupportedValueError("sharded commits are published on the branch head, without a lossy tier: "
                                        "on_conflict='raise' and lossy do not apply")  # fmt: skip
        check_ref_name(branch)
        _check_step_and_message(state.step if step is None else step, message)
        writer = self._sharded_writers.get(branch)
        if writer is None:
            writer = self._sharded_writers[branch] = QckptWriter(self, branch)
        writer.message = message or "commit"
        published = writer.commit(state, metrics=metrics, step=step)
        ids = [published.id if published is not None else None]
        torch.distributed.broadcast_object_list(ids, src=0)  # DCP's coordinator is rank 0
        return self.snapshot(ids[0])

    def restore(self, state: TrainingState, revision: str | Snapshot = "main") -> Snapshot:
        """Load the snapshot at ``revision`` into the live objects of ``state``, in place.

        Everything is validated and read (and digest-checked) before anything is
        modified: a mismatch raises ``StateMismatchError`` listing every
        offending key, damaged data raises ``IntegrityError``; in both cases the
        live state is untouched. A snapshot in the hot tier is copied from
        memory; one read from storage (whose chains stop at the hot tier's
        chunks: a descendant of a hot snapshot decodes only the commits since)
        enters the hot tier (the base of the next commit's deltas). ``revision``
        may be a ``Snapshot`` of this repository: it names itself, so the
        restore does not wait for the commits in flight (a revision string
        waits for them, as every read does: it may name them). The state's
        next commit has the restored snapshot as parent (see ``commit``).
        Returns the restored snapshot.

        A state with sharded (DTensor) modules is restored collectively (call on
        every rank, as ``dcp.load``) from a snapshot a sharded ``commit`` (or
        ``dcp.save`` through ``QckptWriter``) wrote, resharded to this run's
        layout by ``torch.distributed.checkpoint``; a state that does not fit
        (another global shape, a missing key) raises ``StateMismatchError`` on
        every rank before anything is loaded.
        """
        given = isinstance(revision, Snapshot)
        if _sharded_component(state) is not None:
            from qckpt.distributed import QckptReader  # torch.distributed.checkpoint, imported when needed

            reader = QckptReader(self, revision.id if given else revision)
            reader.restore(state)
            return reader.snapshot
        snapshot_id = revision.id if given else self.resolve(revision)
        fetched = None if self._hot.get(snapshot_id) is not None else self._store.prefetch_warm(snapshot_id)
        snap = self._store.snapshot(snapshot_id)
        manifest = self._store.cached_manifest(snap)
        problems = state.problems(manifest.structure)
        if problems:
            raise StateMismatchError(
                f"snapshot {snap.short_id} ({revision}) does not fit the live training state; nothing was modified:",
                problems,
            )
        entries = list(manifest.tensors)
        # from the hot tier, tensors are copied into the live ones where they can be
        in_place = _in_place_targets(state, entries) if self._hot.get(snap.id) is not None else _InPlace.nowhere(entries)
        # modules copy what they load into their own tensors: theirs need no copy of their own (see _kept_by_modules)
        module_paths = tuple(f"components/{n}/" for n, c in state.components.items() if isinstance(c, torch.nn.Module))
        only_read = [e.path.startswith(module_paths) and t is None for e, t in zip(entries, in_place.tensors)]
        copies = self._hot.copy_out(snap.id, [e.path for e in entries], only_read, in_place.into())
        from_hot = copies is not None
        pristine = None
        if copies is None:  # from storage (chains stop at hot chunks); the hot tier gets pristine buffers nobody writes
            in_place = _InPlace.nowhere(entries)  # (a commit in flight may have evicted it since)
            with self._hot.chunks() as hot_chunks:
                read = self._store.read_buffers(snap, entries, pristine=self._hot.max_snapshots > 0, only_read=only_read,
                                                fetched=fetched, known=hot_chunks)  # fmt: skip
            copies, pristine = read.writable, read.pristine
        tree = manifest.tree_of([as_value(c, e) if t is None else t for c, e, t in zip(copies, entries, in_place.tensors)])
        in_place.written()
        state.load(tree, in_place=in_place.modules)
        state.lineage = Lineage(self.config.repository_id, snap.id, restored=True)
        lent = [c for c, r in zip(copies, only_read) if r]
        if _kept_by_modules(state, lent):  # a module kept a buffer it may write: never a delta base
            _log.warning("a module of the restored state kept the tensors it was loaded from; snapshot %s is not "
                         "used as a delta base", snap.short_id)  # fmt: skip
            if from_hot:
                self._writer.submit(lambda: self._hot.discard(snap.id) or snap).wait()
            pristine = None
        if pristine is not None:
            staged = {e.path: StagedArray(e.path, e.kind, e.dtype, e.shape, e.itemsize, b) for e, b in zip(entries, pristine)}
            hot = HotSnapshot(snap.id, staged, {e.path: e for e in entries}, parameter_rules(tree, state.optimizer_layouts()), snap.step)
            self._writer.submit(lambda: self._hot.put(hot) or snap).wait()  # the hot tier changes on the writer thread only
        return snap

    @contextmanager
    def keep_hot(self, revision: str | CommitHandle) -> Iterator[Snapshot | CommitHandle]:
        """Keep the snapshot ``revision`` names in the hot tier while the block runs,
        besides the ``hot_snapshots`` most recent ones (a snapshot not there yet
        enters at its next restore): every restore of it is a memory copy, however
        many commits come in between. The light cone keeps each event's origin so,
        while the futures, each restored from it, commit. Costs that snapshot's host
        memory; after the block it is evicted as usual, by a later commit. Yields
        the snapshot. No effect with ``hot_snapshots=0``.

        ``revision`` may be the handle of a commit this thread has just submitted
        (no commit of its since): that snapshot is kept from when it is written,
        without waiting for it (nothing is kept if the commit fails); yields the
        handle."""
        if isinstance(revision, CommitHandle):
            apply, cancel = self._hot.keep_once_written(lambda: revision.snapshot_id)
            self._writer.submit(apply)  # in order: right after that commit, before any later one evicts it
            try:
                yield revision
            finally:
                cancel()
            return
        snap = self.snapshot(revision)
        self._hot.keep(snap.id)
        try:
            yield snap
        finally:
            self._hot.release(snap.id)

    @contextmanager
    def keep_warm(self, revision: str | Snapshot) -> Iterator[Snapshot]:
        """Keep the warm copy of the snapshot ``revision`` names (if it has one: see
        ``init``) while the block runs, even after its branch has moved on:
        restoring it reads that copy instead of decoding its chain, and a
        descendant's chains stop there (``max_chain`` commits at most). The light
        cone keeps those of its rollback window so, for the origins of its events.
        A ``Snapshot`` names itself: nothing waits for the commits in flight. To
        keep a head's copy, enter the block before the branch's next commit is
        submitted (a copy already replaced is gone). Costs that copy's disk space
        (a raw state) meanwhile; after the block it is deleted unless it is some
        branch's head again (a process that dies first, or a block left after
        ``close``, leaves it to garbage collection, which deletes the copies of
        snapshots that are no head).
        Yields the snapshot. No effect with ``warm=False``."""
        snap = revision if isinstance(revision, Snapshot) else self.snapshot(revision)
        warm = self._warm
        if warm is None:
            yield snap
            return
        self._writer.submit(lambda: warm.keep(snap.id))  # the cadence is the writer thread's: in order with commits
        try:
            yield snap
        finally:  # after a close (a keep let go only when collected): the copy stays, a cache that GC removes
            if not self._closed:
                self._writer.submit(lambda: warm.release(snap.id))

    def load(self, revision: str = "main") -> SnapshotView:
        """A read-only view of a snapshot without any model: tensors by path, read lazily."""
        snap = self.snapshot(revision)
        return SnapshotView(snap, self._store.cached_manifest(snap), self.read_arrays, self._store.read_bytes)

    def manifest(self, snapshot: Snapshot) -> Manifest:
        """The (verified) manifest of ``snapshot``."""
        return self._store.manifest(snapshot)

    def read_arrays(self, snapshot: Snapshot, entries: list[Any]) -> list[Any]:
        """Read and verify the given tensors (``TensorEntry``) of ``snapshot`` as CPU values
        (from the packs, chains stop at the hot tier's chunks, as for ``restore``).

        Raises ``IntegrityError`` naming the snapshot, the state key and the
        object at fault if any chunk (or a chunk it depends on) cannot be read.
        """
        with self._hot.chunks() as hot_chunks:
            return self._store.read_arrays(snapshot, entries, known=hot_chunks)

    # -- snapshots and revisions ----------------------------------------------
    def snapshot(self, revision: str) -> Snapshot:
        """The snapshot a revision names: branch, tag, snapshot id (or unique prefix of
        at least 6 hex digits), optionally followed by ``@STEP`` (the first-parent
        ancestor committed at that step) and ``~N`` (the N-th first-parent
        ancestor: ``main~1`` is the snapshot before main's head), in any order
        and number, applied left to right."""
        return self._store.snapshot(self.resolve(revision))

    def resolve(self, revision: str) -> str:
        """The snapshot id a revision names (see ``snapshot``)."""
        self._writer.flush()
        return self._store.resolve(revision)

    def log(self, *revisions: str, limit: int | None = None) -> list[Snapshot]:
        """Snapshots reachable from the revisions (default ``main``; all parents), newest
        first. Snapshots expired by garbage collection end their line of history."""
        _check_limit(limit)
        self._store.forget_expired()
        heads = [self.snapshot(r) for r in revisions or ("main",)]
        return history(self._store, heads, limit)

    def snapshot_ids(self) -> list[str]:
        """Ids of every snapshot stored, reachable or not."""
        self._writer.flush()
        return self._store.snapshot_ids()

    # -- refs ------------------------------------------------------------------
    def branches(self) -> dict[str, str]:
        """Branch name -> snapshot id."""
        self._writer.flush()
        return self._store.branches()

    def tags(self) -> dict[str, str]:
        """Tag name -> snapshot id."""
        self._writer.flush()
        return self._store.tags()

    def create_branch(self, name: str, at: str = "main") -> Snapshot:
        """Start branch ``name`` at the snapshot ``at`` names. Metadata only: no data is copied."""
        check_ref_name(name, "branch")
        snap = self.snapshot(at)
        self._store.create_ref(BRANCH_PREFIX, name, snap.id, "branch")
        return snap

    def create_tag(self, name: str, at: str = "main") -> Snapshot:
        """Give the snapshot ``at`` names a fixed name."""
        check_ref_name(name, "tag")
        snap = self.snapshot(at)
        self._store.create_ref(TAG_PREFIX, name, snap.id, "tag")
        return snap

    def delete_branch(self, name: str) -> None:
        """Remove a branch ref. Recorded in the ref log: ``restore_branch`` brings it
        back, and garbage collection keeps its snapshots for the ref log's grace
        period (``RetentionPolicy.reflog_grace``)."""
        self._writer.flush()
        self._store.delete_ref(BRANCH_PREFIX, name, "branch")

    def reset(self, branch: str, to: str) -> Snapshot:
        """Move ``branch`` to the snapshot ``to`` names (creating the branch if absent),
        wherever it was: the explicit way to move a branch back or elsewhere.
        Recorded in the ref log; snapshots it leaves behind stay recoverable
        (and protected from garbage collection for the grace period)."""
        check_ref_name(branch)
        snap = self.snapshot(to)
        self._store.reset(branch, snap.id)
        return snap

    def reflog(self, name: str | None = None, *, limit: int | None = None) -> list[RefLogEntry]:
        """Recorded changes of branch or tag ``name`` (every ref if None), newest first:
        what each ref held before and after, when, and why."""
        _check_limit(limit)
        self._writer.flush()
        if name is None:
            return self._store.reflog()[:limit]
        check_ref_name(name)
        entries = self._store.reflog(BRANCH_PREFIX + name) + self._store.reflog(TAG_PREFIX + name)
        return sorted(entries, key=lambda e: -e.time)[:limit]

    def restore_branch(self, name: str) -> Snapshot:
        """Re-create deleted branch ``name`` at the snapshot it held when it was deleted
        (from the ref log). ``AlreadyExistsError`` if it exists."""
        self._writer.flush()
        check_ref_name(name)
        if name in self._store.branches():
            raise AlreadyExistsError(f"branch {name!r} exists")
        deleted = next((e for e in self._store.reflog(BRANCH_PREFIX + name) if e.new is None and e.old), None)
        if deleted is None or deleted.old is None:
            raise RevisionNotFoundError(f"the ref log records no deletion of branch {name!r}")
        snap = self._store.stored_snapshot(deleted.old)
        if snap is None:
            raise RevisionNotFoundError(
                f"branch {name!r} held snapshot {deleted.old[:12]}, which garbage collection has since deleted"
            )
        self._store.create_ref(BRANCH_PREFIX, name, snap.id, "branch", cause="restore")
        return snap

    def delete_tag(self, name: str) -> None:
        """Remove a tag ref."""
        self._writer.flush()
        self._store.delete_ref(TAG_PREFIX, name, "tag")

    # -- maintenance -------------------------------------------------------------
    def stats(self) -> RepositoryStats:
        """Raw versus stored bytes over all snapshots (reads every snapshot record)."""
        snaps = [self._store.snapshot(i) for i in self.snapshot_ids()]
        return RepositoryStats(
            snapshots=len(snaps),
            packs=len(self._store.pack_ids()),
            raw_bytes=sum(s.stats.raw_bytes for s in snaps),
            unique_raw_bytes=sum(s.stats.new_raw_bytes for s in snaps),
            stored_bytes=self._store.stored_bytes(),
            warm_bytes=self._store.warm.stored_bytes(),
        )

    def usage(self) -> dict[str, BranchUsage]:
        """Per branch: its history's snapshots and raw bytes, and the stored bytes no
        other branch or tag needs (what deleting it frees, once the ref log's grace
        has passed and GC runs)."""
        self._writer.flush()
        return branch_usage(self._store)

    def rebuild_index(self) -> int:
        """Re-read every pack footer into the chunk index; returns the number of packs indexed.

        A pack whose footer is damaged is skipped with a warning on the ``qckpt``
        logger: its chunks then read as missing, naming the snapshot that needs them.
        """
        return self._store.rebuild_index()

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
        if policy is not None and not isinstance(policy, RetentionPolicy):
            raise InvalidInputError(f"policy must be a RetentionPolicy or None, got {policy!r}")
        self._writer.flush()
        return collect_garbage(self._store, policy or RetentionPolicy(), dry_run=dry_run, progress=progress)

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
        A winner in the hot tier is the join's there too (the same tensors):
        restoring the join is then a memory copy, and a commit on it predicts
        from them.
        """
        self._writer.flush()
        snap, winner = pick_best(self._store, target, candidates, metric, mode, message, allow_lossy)
        self._hot.alias(snap.id, winner.id)
        return snap

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
        self._writer.flush()
        return average(self._store, revisions, branch, weights, message, allow_lossy)

    def diff(self, a: str, b: str) -> list[TensorDiff]:
        """Per-tensor comparison of two revisions (see ``TensorDiff``)."""
        return diff_snapshots(self._store, self.snapshot(a), self.snapshot(b))

    def export_zarr(
        self, revision: str, dest: str | os.PathLike[str], progress: Callable[[str, int, int], None] | None = None
    ) -> int:
        """Write a snapshot to a new zarr v3 directory readable without qckpt; returns the array count."""
        return export_zarr(self._store, self.snapshot(revision), local_path(dest), progress)

    def export(
        self,
        revision: str,
        dest: str | os.PathLike[str],
        format: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> int:
        """Write a snapshot to ``dest`` (which must not exist; missing parent directories
        are created) as ``format``: ``"zarr"`` (a directory, see ``export_zarr``),
        ``"torch"`` (one ``torch.save`` file of the whole committed tree) or
        ``"safetensors"`` (every tensor by state path). Without ``format``,
        ``dest``'s suffix decides (``.pt``/``.pth``, ``.safetensors``; otherwise
        zarr). Written under a temporary name and renamed into place when
        complete: a failed export leaves nothing at ``dest``. Returns the number
        of tensors."""
        path = local_path(dest)
        fmt = format_for(path, format)
        if fmt == "zarr":
            return self.export_zarr(revision, path, progress)
        return export_file(self.load(revision), path, fmt, progress)

    def zarr_store(self, revision: str) -> SnapshotStore:
        """The snapshot at ``revision`` as a read-only zarr v3 store (``zarr.open_group(store,
        mode="r")``): arrays at state paths, chunks read lazily from this repository."""
        return SnapshotStore(self._store, self.snapshot(revision))

    def fsck(self, progress: Callable[[str, int, int], None] | None = None) -> FsckReport:
        """Verify every ref, reachable snapshot, manifest, chunk digest and pack footer.

        Never raises for damage: returns a report naming each damaged thing and
        the snapshots and state keys it affects (``report.ok`` is False then).
        """
        self._writer.flush()
        return check_repository(self._store, progress)


def _check_step_and_message(step: int | None, message: str) -> None:
    if step is not None and not is_whole(step, 0):
        raise InvalidInputError(f"step must be a whole number >= 0 (or None), got {step!r}")
    if not isinstance(message, str):
        raise InvalidInputError(f"message must be a str, got {message!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and not is_whole(limit, 0):
        raise InvalidInputError(f"limit must be None or a whole number >= 0, got {limit!r}")


def _sharded_component(state: TrainingState) -> str | None:
    """The name of a module of ``state`` with sharded (DTensor) parameters, if any."""
    for name, component in state.components.items():
        if isinstance(component, torch.nn.Module) and any(is_sharded(p) for p in component.parameters()):
            return name
    return None


@dataclass(frozen=True)
class _InPlace:
    """Where a restore from the hot tier copies into the live state's own tensors
    (see ``_in_place_targets``)."""

    tensors: list[torch.Tensor | None]  # per entry: the live tensor it is copied into, or None
    modules: frozenset[str] = frozenset()  # module components whose every tensor is among them

    @classmethod
    def nowhere(cls, entries: list[TensorEntry]) -> _InPlace:
        return cls([None] * len(entries))

    def into(self) -> list[torch.Tensor | None]:
        """Each target as a 1-D view, as ``HotTier.copy_out`` writes into it (on a GPU,
        one host-to-device copy from the hot buffer)."""
        return [None if t is None else flat_elements(t.detach()) for t in self.tensors]

    def written(self) -> None:
        """Record the copies with autograd, as ``copy_`` would: a backward through a graph
        that saved a parameter's old values then raises instead of using the new ones."""
        torch.autograd.graph.increment_version([t for t in self.tensors if t is not None])


def _in_place_targets(state: TrainingState, entries: list[TensorEntry]) -> _InPlace:
    """The live tensors a restore from the hot tier may copy entries into in place.

    Modules: every parameter and buffer of a module component whose loading is
    ``Module``'s own throughout (no override, hook or extra state: it would copy
    each key's values into the tensor ``state_dict(keep_vars=True)`` holds there),
    provided each is a contiguous, non-empty CPU or CUDA tensor of the entry's
    dtype and shape; otherwise none of that module's (it loads as before, with
    ``load_state_dict``). Such a module is not loaded again.

    Optimizers: tensors of at least 64 KiB (a small new buffer costs nothing
    worth checking for) of the entry's dtype and shape that are all of their
    storage, share it with no module tensor and no other entry. A rollback into
    optimizers that have state already (every future of the light cone) then
    writes memory the process owns instead of allocating, and faulting in, new
    buffers (at 100M parameters, 800 MB of AdamW moments a restore; figures in
    docs/design.md); on a GPU it copies each hot buffer (pinned, when staged from
    the GPU) to the device once, where it went through a new host copy and a
    pageable transfer. Restores from storage gained nothing measurable this way
    and do not use it. Anything else gets a new buffer, as before. Asking for a
    storage's address gives a copy-on-write (forked) tensor memory of its own,
    so nothing is written through to what it shared."""
    position = {e.path: i for i, e in enumerate(entries)}
    targets: list[torch.Tensor | None] = [None] * len(entries)
    modules = set()
    for name, component in state.components.items():
        if isinstance(component, torch.nn.Module) and _loads_by_copying(component):
            base = join_path("components", name)  # the paths capture() gives
            found = [(position.get(join_path(base, key)), value) for key, value in component.state_dict(keep_vars=True).items()]
            if all(i is not None and isinstance(t, torch.Tensor) and _fits(t, entries[i]) for i, t in found):
                for i, t in found:
                    targets[i] = t  # type: ignore[index]
                modules.add(name)
    taken = {t.untyped_storage().data_ptr() for c in state.components.values() if isinstance(c, torch.nn.Module)
             for t in itertools.chain(c.parameters(), c.buffers())}  # fmt: skip
    for name, component in state.components.items():
        if isinstance(component, torch.optim.Optimizer):
            per_param = component.state_dict().get("state")
            base = join_path(join_path("components", name), "state")
            for index, values in per_param.items() if isinstance(per_param, dict) else ():
                for key, t in values.items():
                    i = position.get(join_path(join_path(base, index), key))
                    if i is None or not isinstance(t, torch.Tensor) or t.nbytes < _IN_PLACE_MIN_BYTES:
                        continue
                    if _fits(t, entries[i]) and not t.requires_grad and _owns_its_storage(t):
                        storage = t.untyped_storage().data_ptr()
                        if storage not in taken:
                            taken.add(storage)
                            targets[i] = t
    return _InPlace(targets, frozenset(modules))


def _fits(t: torch.Tensor, entry: TensorEntry) -> bool:
    """A contiguous, non-empty CPU or CUDA tensor of the entry's dtype and shape."""
    return (entry.kind == "tensor" and t.device.type in ("cpu", "cuda") and t.numel() > 0 and t.is_contiguous()
            and tuple(t.shape) == entry.shape and torch_dtype_name(t.dtype) == entry.dtype)  # fmt: skip


def _owns_its_storage(t: torch.Tensor) -> bool:
    """A tensor that is all of its storage (no view of a larger one)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes


# Loading of torch's normalisation layers: key migrations for checkpoints older than the layer
# (a ``num_batches_tracked`` added when missing, running statistics dropped where the layer keeps
# none), then ``Module``'s own copying. A restore first checks that the snapshot holds exactly the
# live module's keys, so neither migration ever applies to it.
_COPYING_LOADERS = (torch.nn.Module._load_from_state_dict, torch.nn.modules.batchnorm._NormBase._load_from_state_dict,
                    torch.nn.modules.instancenorm._InstanceNorm._load_from_state_dict)  # fmt: skip


def _loads_by_copying(module: torch.nn.Module) -> bool:
    """Whether ``module.load_state_dict`` does nothing but copy each key's values into
    the tensor its ``state_dict(keep_vars=True)`` holds: ``Module``'s own loading in
    every submodule (or a normalisation layer's, see ``_COPYING_LOADERS``), no
    load or state-dict hook, no extra state."""
    def own(m: torch.nn.Module, name: str) -> bool:  # bound to Module's own method (not a class's or an instance's)
        return getattr(getattr(m, name), "__func__", None) is getattr(torch.nn.Module, name)

    return own(module, "load_state_dict") and all(
        getattr(m._load_from_state_dict, "__func__", None) in _COPYING_LOADERS
        and own(m, "set_extra_state") and own(m, "state_dict")
        and not (m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks or m._state_dict_hooks or m._state_dict_pre_hooks)
        for m in module.modules()
    )  # fmt: skip


def _kept_by_modules(state: TrainingState, buffers: list[np.ndarray]) -> bool:
    """Whether a module component of ``state`` now holds a tensor inside one of
    ``buffers``: ``Module.load_state_dict`` copies into the module's own tensors,
    but a module that overrides loading could keep what it was given."""
    spans = sorted((b.ctypes.data, b.ctypes.data + b.nbytes) for b in buffers if b.nbytes)
    if not spans:
        return False
    starts = [lo for lo, _ in spans]
    for component in state.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in component.state_dict().values():
                i = bisect.bisect_right(starts, tensor.data_ptr()) - 1
                if i >= 0 and tensor.data_ptr() < spans[i][1]:
                    return True
    return False


def _check_tiers(hot_snapshots: int, hot_bytes: int | None, max_pending: int, warm_interval: float | None) -> None:
    if not is_whole(hot_snapshots, 0) or (hot_bytes is not None and not is_whole(hot_bytes, 0)) or not is_whole(max_pending, 1):
        raise InvalidInputError("hot_snapshots and hot_bytes must be whole numbers >= 0 (hot_bytes may be None), max_pending one "
                                f">= 1; got {hot_snapshots!r}, {hot_bytes!r}, {max_pending!r}")  # fmt: skip
    if warm_interval is not None and (isinstance(warm_interval, bool) or not isinstance(warm_interval, (int, float))
                                      or not warm_interval >= 0):  # fmt: skip
        raise InvalidInputError(f"warm_interval must be a number of seconds >= 0 (math.inf: only at flush and close), got {warm_interval!r}")


def _number(value: Any) -> Any:
    """A metric as a plain int or float: one-element tensors and NumPy scalars are
    converted (``loss.item()`` need not be written); anything else is returned as is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        return value.item()
    if isinstance(value, np.generic) and isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    metrics = {k: _number(v) for k, v in (metrics or {}).items()}
    bad = [k for k, v in metrics.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise InvalidInputError(f"metrics must map names to numbers (plain, 0-d tensors or NumPy scalars); bad entries: {bad}")
    return metrics
