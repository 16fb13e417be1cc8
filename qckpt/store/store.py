"""The storage engine: one repository on one backend, and its one write transaction.

``Store`` owns the backend, the repository config, the chunk index, the
reader and the caches of immutable records. Everything that writes a snapshot
goes through ``Store.transaction``, which performs the steps of invariant 2 in
this order, once:

1. take the writer lock shared (garbage collection takes it exclusive);
2. record the current format version in the config before the first write to
   an older repository;
3. bring the chunk index up to date after a garbage collection elsewhere;
4. read the branch head;
5. let the caller write objects (packs, then index entries) and the manifest;
6. write the snapshot record and move the branch by compare-and-swap (with
   its ref log record, see ``change_ref``); if another writer moved it
   meanwhile, rebuild the snapshot on the new head and publish again (only a
   snapshot record is rewritten), or raise ``RefConflictError``.

The store is thread-safe. It knows nothing of training states, staging, the
hot tier or asynchronous commits (the ``commit`` layer above it) nor of the
facade.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from qckpt.backends import Backend, Lease, MappedBlob
from qckpt.errors import (
    AlreadyExistsError,
    AmbiguousRevisionError,
    FormatVersionError,
    IntegrityError,
    InvalidInputError,
    ObjectNotFoundError,
    RefConflictError,
    RepositoryClosedError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from qckpt.format.codecs import Raw
from qckpt.format.ids import ID_HEX, hex_id
from qckpt.format.packs import TRAILER_SIZE, ChunkLocation, PackBuilder, footer_span, read_pack_footer
from qckpt.format.records import Manifest, RefLogEntry, Snapshot, TensorEntry
from qckpt.format.tensors import copied, numpy_dtype, torch_dtype
from qckpt.store.index import ChunkIndex, LmdbIndex, MemoryIndex
from qckpt.store.layout import (
    BRANCH_PREFIX,
    CONFIG_KEY,
    GC_GENERATION_REF,
    MANIFEST_PREFIX,
    PACK_PREFIX,
    RECORD_PREFIXES,
    REFLOG_PREFIX,
    SNAPSHOT_PREFIX,
    TAG_PREFIX,
    manifest_key,
    pack_id_of,
    pack_key,
    REWIND_SUFFIX,
    reflog_key,
    reflog_key_time,
    snapshot_key,
)
from qckpt.store.reader import ChunkReader
from qckpt.store.refs import check_ref_name
from qckpt.store.warm import WarmCopies, WarmRead

# 2: delta and predictive codecs, pack footers with dependencies; 3: lossy-tier payloads; 4: warm copies;
# 5: shared S3 lock listing; 6: deferred objects (codec 7), compacted later
REPOSITORY_VERSION = 6
DEFAULT_CHUNK_SIZE = 1 << 20
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_MAX_CHAIN = 16
_MAX_PUBLISH_ATTEMPTS = 1000
_REVISION_SUFFIX = re.compile(r"(.+)([@~])([0-9]+)")  # the last @STEP or ~N of a revision
_log = logging.getLogger("qckpt")


@dataclass(frozen=True)
class RepositoryConfig:
    """Settings fixed when the repository is created (stored under ``config``)."""

    repository_id: str
    chunk_size: int
    compression_level: int
    version: int = REPOSITORY_VERSION
    max_chain: int = DEFAULT_MAX_CHAIN  # longest dependency chain a commit may create (1: no deltas)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


SnapshotFactory = Callable[[str | None], Snapshot]  # parent head -> the snapshot to publish on it
T = TypeVar("T")


@dataclass(frozen=True)
class ReadBuffers:
    """Verified bytes of some tensors of a snapshot, one flat uint8 array per entry.
    ``writable`` belong to the caller. ``pristine`` (when asked for) hold the same
    bytes and are never written by anyone, so they can serve as a delta base; they
    may be read-only (a mapped warm copy). ``warm``: read from the warm copy."""

    writable: list[np.ndarray]
    pristine: list[np.ndarray] | None
    warm: bool


@dataclass(frozen=True)
class Transaction:
    """What a transaction's ``build`` step sees: the store, the branch and its head
    as read under the writer lock. Objects written through it stay safe from
    garbage collection until the transaction ends."""

    store: Store
    branch: str
    head: str | None

    def put_manifest(self, manifest: Manifest) -> str:
        """Write ``manifest`` (after the objects it lists); returns its id."""
        data = manifest.to_bytes()
        manifest_id = hex_id(data)
        self.store.backend.put(manifest_key(manifest_id), data)
        self.store.keep_manifest(manifest_id, manifest)  # the next restore of this commit reads nothing back
        _ = manifest.structure  # and decodes nothing: decoded here, on the writer, off the training thread
        return manifest_id


def _index_for(backend: Backend, config: RepositoryConfig, cache_dir: str | os.PathLike[str] | None) -> ChunkIndex:
    """Where the backend's capabilities say the chunk index belongs: in memory, in the
    backend's own local directory, or in a local cache (``cache_dir``, else
    ``$QCKPT_CACHE_DIR``, else ``~/.cache/qckpt``) keyed by repository id."""
    placement = backend.capabilities.index
    if placement == "memory":
        return MemoryIndex()
    if placement == "local":
        assert backend.capabilities.local_dir is not None  # Capabilities checks this
        return LmdbIndex(backend.capabilities.local_dir / ".index")
    root = Path(cache_dir or os.environ.get("QCKPT_CACHE_DIR") or Path.home() / ".cache" / "qckpt")
    return LmdbIndex(root / config.repository_id / "index")


class ClosedPart:
    """What the parts of a closed store or repository become: any use raises
    ``RepositoryClosedError``, so one place guards every call that reaches them."""

    def __init__(self, uri: str) -> None:
        self._uri = uri

    def __getattr__(self, name: str) -> Any:
        raise RepositoryClosedError(f"the repository at {self._uri} was closed; open it again to use it")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS keeps one
    (a container's or ``taskset``'s limit), else every core."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


class Store:
    """A repository's storage engine (see the module docstring). Create with
    ``create`` or ``open``; ``close`` when done. Thread-safe."""

    def __init__(self, backend: Backend, config: RepositoryConfig, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.backend = backend
        self.config = config
        self.index = _index_for(backend, config, cache_dir)
        self.workers = available_cores()
        # encoding and decoding objects: a thread per core (more only contend for the GIL and fresh memory:
        # a 10M model's middle snapshot decoded in 3.2 s on 16 threads, 1.8 s on 2, on 2 cores)
        self.compute = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="qckpt-cpu")
        # storage reads and writes mostly wait (on the network for S3): more threads than cores
        self.pool = ThreadPoolExecutor(max_workers=max(16, self.workers), thread_name_prefix="qckpt-io")
        self._seen: dict[bytes, ChunkLocation] = {}  # this process's own footer scan, see ``locate``
        self.reader = ChunkReader(backend, self.locate, self.pool, self.compute, refresh=self.rescan_packs)
        self.warm = WarmCopies(backend, self.pool)
        self._snapshots: dict[str, Snapshot] = {}
        self._snapshots_generation: str | None = None  # the GC generation ``forget_expired`` last saw
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()  # see ``cached_manifest``
        self._rebuild_lock = threading.Lock()
        self._config_lock = threading.Lock()
        self._manifests_lock = threading.Lock()

    @classmethod
    def create(cls, backend: Backend, config: RepositoryConfig, cache_dir: str | os.PathLike[str] | None = None) -> Store:
        """Write ``config`` to an empty location (``AlreadyExistsError`` if a repository is there)."""
        try:
            backend.put(CONFIG_KEY, config.to_bytes(), exclusive=True)
        except AlreadyExistsError:
            raise AlreadyExistsError(f"a repository exists already at {backend.uri}") from None
        return cls(backend, config, cache_dir)

    @classmethod
    def open(cls, backend: Backend, cache_dir: str | os.PathLike[str] | None = None) -> Store:
        """Open the repository at ``backend`` (``RepositoryNotFoundError`` if none,
        ``FormatVersionError`` if written by a newer qckpt)."""
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
            config = RepositoryConfig(**doc)
        except TypeError as e:
            raise IntegrityError(f"repository config at {backend.uri} is damaged: {e}") from e
        return cls(backend, config, cache_dir)

    def close(self) -> None:
        """Finish background reads, release the index and the backend. Closing again
        does nothing; anything else on a closed store (a ``SnapshotView`` or zarr
        store that outlived its repository, say) raises ``RepositoryClosedError``."""
        if isinstance(self.backend, ClosedPart):
            return
        closed = ClosedPart(self.backend.uri)
        try:
            self.pool.shutdown(wait=True)
            self.compute.shutdown(wait=True)
            self.index.close()
        finally:
            try:
                self.backend.close()
            finally:
                self.backend = self.index = self.pool = self.compute = self.reader = self.warm = closed  # type: ignore[assignment]

    # -- the write transaction ------------------------------------------------------
    def transaction(
        self, branch: str, build: Callable[[Transaction], SnapshotFactory], *, cause: str, on_conflict: str = "retry"
    ) -> Snapshot:
        """Publish a new snapshot on ``branch`` (created if absent), in the steps of the
        module docstring. ``build(txn)`` writes objects and the manifest and returns
        a function that makes the snapshot record for a given parent head; it is
        called again with the new head if the branch moved (``on_conflict="retry"``,
        never for a branch deleted meanwhile) or ``RefConflictError`` is raised
        (``on_conflict="raise"``). ``cause`` is recorded in the ref log."""
        check_ref_name(branch)
        if on_conflict not in ("retry", "raise"):
            raise InvalidInputError(f"on_conflict must be 'retry' or 'raise', got {on_conflict!r}")
        with self._writing() as lease:
            head = self.read_ref(BRANCH_PREFIX + branch)
            snapshot_on = build(Transaction(self, branch, head))
            return self._publish(branch, head, snapshot_on, cause, lease, retry=on_conflict == "retry")

    def write_unpublished(self, write: Callable[[Transaction], T]) -> T:
        """Steps 1-3 and 5 of a transaction without the publication: ``write(txn)``
        writes objects (packs, index entries) that a manifest written elsewhere
        will list (a rank of a ``torch.distributed.checkpoint`` save; its
        coordinator publishes). Nothing references them when this returns, so the
        caller must keep garbage collection away until they are published (the
        coordinator holds the lock shared from before any rank writes until it
        has published); a publication that never comes leaves garbage only."""
        with self._writing():
            return write(Transaction(self, "", None))

    @contextmanager
    def _writing(self) -> Iterator[Lease]:
        """Steps 1-3: the writer lock held shared (GC must not sweep what a writer
        dedups against), the config's version current, the index in sync."""
        with self.backend.lock(exclusive=False) as lease:
            self._upgrade_config()
            self.sync_index()
            yield lease

    def _upgrade_config(self) -> None:
        """Before the first write to a repository of an older format version, record
        the current version, so an older qckpt refuses it instead of misreading it."""
        with self._config_lock:
            if self.config.version < REPOSITORY_VERSION:
                upgraded = replace(self.config, version=REPOSITORY_VERSION)
                self.backend.put(CONFIG_KEY, upgraded.to_bytes())
                self.config = upgraded

    def _publish(
        self, branch: str, head: str | None, snapshot_on: SnapshotFactory, cause: str, lease: Lease, *, retry: bool
    ) -> Snapshot:
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            snapshot = snapshot_on(head)
            self.backend.put(snapshot_key(snapshot.id), snapshot.to_bytes())
            lease.check()  # a lapsed lock let GC in: what this snapshot dedups against may be gone
            try:
                rewinds = head is not None and head not in snapshot.parents
                self.change_ref(BRANCH_PREFIX + branch, head, snapshot.id, cause, rewinds=rewinds)
            except RefConflictError as e:
                if not retry or e.actual is None:  # never recreate a branch deleted meanwhile
                    raise
                head = e.actual
                continue
            self._snapshots[snapshot.id] = snapshot
            return snapshot
        raise RefConflictError(BRANCH_PREFIX + branch, head, self.read_ref(BRANCH_PREFIX + branch))

    def put_pack(self, builder: PackBuilder) -> dict[bytes, ChunkLocation]:
        """Write the pack ``builder`` holds; returns where its objects now are (not yet indexed)."""
        pack_id, data, locations = builder.finish()
        self.backend.put(pack_key(pack_id), data)
        return locations

    # -- the chunk index ----------------------------------------------------------------
    def sync_index(self) -> None:
        """With the writer lock held: rebuild the index if it is empty (a fresh cache)
        or a garbage collection (here or on another machine) ran since it was last
        brought up to date, so no commit dedups against a chunk that GC deleted.
        Only writers holding the lock write the index."""
        generation = self.backend.read_ref(GC_GENERATION_REF)
        if generation != self.index.generation() or len(self.index) == 0:
            self.index_packs(fresh=True)
            self.index.set_generation(generation)

    def rebuild_index(self) -> int:
        """Re-read every pack footer into the chunk index (under the writer lock);
        returns the number of packs indexed."""
        with self.backend.lock(exclusive=False):
            return self.index_packs()

    def index_packs(self, *, fresh: bool = False) -> int:
        """``rebuild_index`` for callers that hold the writer lock already; ``fresh``
        first forgets every entry, except those in packs whose footer cannot be read
        now (what the index knew of them may still be right: reads verify it, and no
        garbage collection completes while a footer is damaged)."""
        with self._rebuild_lock:
            found, damaged = self._scan_footers()
            if fresh:
                kept = self.index.entries_in(damaged) if damaged else {}
                self.index.clear()
                self.index.put_many(kept)
            for contents in found:
                self.index.put_many(contents)
        return len(found)

    def rescan_packs(self) -> None:
        """Without any lock: re-read every pack footer into this process's own map,
        which ``locate`` consults before the shared index. Readers call it when a
        chunk is not found where the index says (a fresh cache, a garbage collection
        on another machine), so opening and reading never wait for the writer lock;
        the shared index is left to writers, which sync it under the lock."""
        seen: dict[bytes, ChunkLocation] = {}
        for contents in self._scan_footers()[0]:
            seen.update(contents)
        self._seen = seen

    def locate(self, chunk_id: bytes) -> ChunkLocation | None:
        """Where ``chunk_id`` is stored: this process's latest footer scan, else the index."""
        return self._seen.get(chunk_id) or self.index.get(chunk_id)

    def _scan_footers(self) -> tuple[list[dict[bytes, ChunkLocation]], list[str]]:
        """Every readable pack footer, and the ids of packs whose footer is damaged
        (skipped with a warning on the ``qckpt`` logger: their chunks may then read as
        missing, naming the snapshot that needs them). A pack deleted since the
        listing is skipped quietly."""
        damaged: list[str] = []

        def footer(pack_id: str) -> dict[bytes, ChunkLocation] | None:
            try:
                return self.pack_contents(pack_id)
            except ObjectNotFoundError:
                return None
            except IntegrityError as e:
                _log.warning("skipping damaged pack %s while reading pack footers: %s", pack_id, e)
                damaged.append(pack_id)
                return None

        found = [f for f in self.pool.map(footer, self.pack_ids()) if f is not None]
        return found, damaged

    def pack_ids(self) -> list[str]:
        return [pack_id_of(k) for k in self.backend.list(PACK_PREFIX)]

    def pack_contents(self, pack_id: str) -> dict[bytes, ChunkLocation]:
        """Chunk locations listed in a pack's footer (``IntegrityError`` if damaged)."""
        key = pack_key(pack_id)
        size = self.backend.size(key)
        trailer = self.backend.get_range(key, max(0, size - TRAILER_SIZE), TRAILER_SIZE)
        span = footer_span(pack_id, trailer, size)
        return read_pack_footer(pack_id, self.backend.get_range(key, span.offset, span.length), span)

    # -- records ------------------------------------------------------------------------
    def snapshot(self, snapshot_id: str) -> Snapshot:
        """The stored snapshot with this full id (``RevisionNotFoundError`` if absent)."""
        if snapshot_id not in self._snapshots:
            try:
                data = self.backend.get(snapshot_key(snapshot_id))
            except ObjectNotFoundError:
                raise RevisionNotFoundError(f"snapshot {snapshot_id} does not exist") from None
            self._snapshots[snapshot_id] = Snapshot.from_bytes(snapshot_id, data)
        return self._snapshots[snapshot_id]

    def stored_snapshot(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot with this id, or None if it was expired by garbage collection."""
        try:
            return self.snapshot(snapshot_id)
        except RevisionNotFoundError:
            return None

    def forget_snapshot(self, snapshot_id: str) -> None:
        """Drop a deleted snapshot from the cache (garbage collection)."""
        self._snapshots.pop(snapshot_id, None)

    def forget_expired(self) -> None:
        """Before walking history: drop the cached snapshot records if a garbage
        collection ran (in this process or another) since they were read, so a
        snapshot it expired is not taken for a stored one. One ref read."""
        generation = self.backend.read_ref(GC_GENERATION_REF)
        if generation != self._snapshots_generation:
            self._snapshots = {}
            self._snapshots_generation = generation

    def snapshot_ids(self) -> list[str]:
        """Ids of every snapshot stored, reachable or not."""
        return [key.removeprefix(SNAPSHOT_PREFIX) for key in self.backend.list(SNAPSHOT_PREFIX)]

    def manifest_ids(self) -> list[str]:
        return [key.removeprefix(MANIFEST_PREFIX) for key in self.backend.list(MANIFEST_PREFIX)]

    def manifest_by_id(self, manifest_id: str) -> Manifest:
        try:
            data = self.backend.get(manifest_key(manifest_id))
        except ObjectNotFoundError:
            raise IntegrityError(f"manifest {manifest_id} is missing") from None
        return Manifest.from_bytes(manifest_id, data)

    def cached_manifest(self, snapshot: Snapshot) -> Manifest:
        """``manifest``, kept for reads that repeat (restores, warm reads): manifests
        are immutable and were verified when read. Checks (fsck, GC) use ``manifest``."""
        with self._manifests_lock:
            manifest = self._manifests.get(snapshot.manifest)
        if manifest is None:
            manifest = self.manifest(snapshot)
            self.keep_manifest(snapshot.manifest, manifest)
        return manifest

    def keep_manifest(self, manifest_id: str, manifest: Manifest) -> None:
        """Add to ``cached_manifest``'s cache (the 8 most recent): a manifest read and
        verified, or one just written (equal to what reading it back gives)."""
        with self._manifests_lock:
            self._manifests[manifest_id] = manifest
            self._manifests.move_to_end(manifest_id)
            while len(self._manifests) > 8:
                self._manifests.popitem(last=False)

    def manifest(self, snapshot: Snapshot) -> Manifest:
        """The (verified) manifest of ``snapshot``, read now."""
        try:
            return self.manifest_by_id(snapshot.manifest)
        except IntegrityError as e:
            raise IntegrityError(f"snapshot {snapshot.short_id}: {e}") from e

    def stored_bytes(self) -> int:
        """Bytes in packs, manifests and snapshot records."""
        return sum(self.backend.size(k) for prefix in RECORD_PREFIXES for k in self.backend.list(prefix))

    # -- refs and revisions ---------------------------------------------------------------
    def read_ref(self, ref: str) -> str | None:
        """The snapshot id branch or tag ``ref`` (``heads/main``) holds, or None if it is
        absent; ``IntegrityError`` if it holds anything but a full snapshot id."""
        value = self.backend.read_ref(ref)
        return None if value is None else checked_ref(ref, value)

    def branches(self) -> dict[str, str]:
        """Branch name -> snapshot id (``IntegrityError`` names a damaged ref)."""
        return {k.removeprefix(BRANCH_PREFIX): checked_ref(k, v) for k, v in self.backend.list_refs(BRANCH_PREFIX).items()}

    def tags(self) -> dict[str, str]:
        """Tag name -> snapshot id (``IntegrityError`` names a damaged ref)."""
        return {k.removeprefix(TAG_PREFIX): checked_ref(k, v) for k, v in self.backend.list_refs(TAG_PREFIX).items()}

    def change_ref(self, ref: str, old: str | None, new: str | None, cause: str, *, rewinds: bool) -> None:
        """Move ``ref`` from ``old`` to ``new`` by compare-and-swap, recording the change
        in the ref log first (the record is removed again if the swap loses). A
        crash between the two leaves a record of a change that did not happen:
        it can only make garbage collection keep more."""
        time_ns = time.time_ns()
        logged_old = old if old is not None and ID_HEX.fullmatch(old) else None  # a damaged value is not an id
        entry = RefLogEntry(ref, logged_old, new, time_ns / 1e9, cause, rewinds)
        key = reflog_key(ref, time_ns, uuid.uuid4().hex[:8], rewinds)
        self.backend.put(key, entry.to_bytes())
        try:
            self.backend.swap_ref(ref, old, new)
        except RefConflictError:
            self.backend.delete(key)
            raise

    def reflog(self, ref: str | None = None, *, rewinding_since: float | None = None) -> list[RefLogEntry]:
        """Recorded changes of ``ref`` (``heads/main``; every branch and tag if None),
        newest first; with ``rewinding_since``, only changes that left a snapshot
        behind at or after that time (chosen by key, reading only those records)."""
        keys = self.backend.list(REFLOG_PREFIX + (ref + "/" if ref else ""))
        if rewinding_since is not None:
            keys = [k for k in keys if k.endswith(REWIND_SUFFIX) and reflog_key_time(k) >= rewinding_since]
        entries = list(self.pool.map(lambda k: RefLogEntry.from_bytes(k, self.backend.get(k)), keys))
        return sorted(entries, key=lambda e: -e.time)

    def is_ancestor(self, ancestor: str, snapshot_id: str) -> bool:
        """Whether ``ancestor`` is ``snapshot_id`` or in its stored history (any parents)."""
        seen, stack = set(), [snapshot_id]
        while stack:
            current = stack.pop()
            if current == ancestor:
                return True
            if current not in seen:
                seen.add(current)
                snap = self.stored_snapshot(current)
                stack.extend(snap.parents if snap is not None else ())
        return False

    def create_ref(self, prefix: str, name: str, snapshot_id: str, kind: str, cause: str = "create") -> None:
        check_ref_name(name, kind)
        other = TAG_PREFIX if prefix == BRANCH_PREFIX else BRANCH_PREFIX
        if self.backend.read_ref(other + name) is not None:  # even a damaged one: the name is taken
            raise AlreadyExistsError(f"{name!r} is already a {'tag' if other == TAG_PREFIX else 'branch'}")
        try:
            self.change_ref(prefix + name, None, snapshot_id, cause, rewinds=False)
        except RefConflictError:
            raise AlreadyExistsError(f"{kind} {name!r} exists already") from None

    def delete_ref(self, prefix: str, name: str, kind: str, cause: str = "delete") -> str:
        """Remove a ref; returns the snapshot id it held."""
        check_ref_name(name, kind)
        current = self.backend.read_ref(prefix + name)  # a damaged ref can still be deleted
        if current is None:
            raise RevisionNotFoundError(f"no {kind} named {name!r}")
        self.change_ref(prefix + name, current, None, cause, rewinds=True)
        return current

    def reset(self, branch: str, snapshot_id: str) -> str | None:
        """Move ``branch`` to ``snapshot_id`` (creating it if absent); returns where it was."""
        check_ref_name(branch)
        current = self.backend.read_ref(BRANCH_PREFIX + branch)  # a damaged ref can be reset: that repairs it
        if current is not None and not ID_HEX.fullmatch(current):
            self.change_ref(BRANCH_PREFIX + branch, current, snapshot_id, "reset (repairing a damaged ref)", rewinds=False)
            return None
        rewinds = current is not None and not self.is_ancestor(current, snapshot_id)
        self.change_ref(BRANCH_PREFIX + branch, current, snapshot_id, "reset", rewinds=rewinds)
        return current

    def resolve(self, revision: str) -> str:
        """The snapshot id a revision names: branch, tag, snapshot id (or unique prefix
        of at least 6 hex digits), followed by any number of suffixes, applied left
        to right along first parents: ``@STEP`` picks the ancestor committed at
        that step, ``~N`` the N-th ancestor (``main~1``: the snapshot before
        main's head)."""
        if not isinstance(revision, str) or not revision:
            raise InvalidInputError(f"revision must be a non-empty string, got {revision!r}")
        match = _REVISION_SUFFIX.fullmatch(revision)
        if match is None:
            return self._resolve_name(revision)
        base, suffix, number = match.group(1), match.group(2), int(match.group(3))
        history = self.first_parents(self.resolve(base))
        if suffix == "~":
            reached = list(itertools.islice(history, number + 1))  # reads no further back than needed
            if len(reached) == number + 1:
                return reached[-1].id
            raise RevisionNotFoundError(f"{revision!r} goes back too far: the first-parent history of {base!r} "
                                        f"holds {len(reached)} snapshots ({base}~{len(reached) - 1} is the oldest)")
        for snap in history:
            if snap.step == number:
                return snap.id
        raise RevisionNotFoundError(f"no snapshot at step {number} in the history of {base!r}")

    def _resolve_name(self, name: str) -> str:
        for prefix in (BRANCH_PREFIX, TAG_PREFIX):
            try:
                target = self.read_ref(prefix + check_ref_name(name))
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
                return matches[0].removeprefix(SNAPSHOT_PREFIX)
        known = ", ".join(sorted(self.branches())[:10]) or "none"
        raise RevisionNotFoundError(f"unknown revision {name!r}: no branch, tag or snapshot id matches (branches: {known})")

    def first_parents(self, snapshot_id: str) -> Iterator[Snapshot]:
        """The snapshot and its first-parent ancestors, up to the first expired one."""
        snap: Snapshot | None = self.snapshot(snapshot_id)
        while snap is not None:
            yield snap
            snap = self.stored_snapshot(snap.parents[0]) if snap.parents else None

    # -- reads ------------------------------------------------------------------------
    def read_arrays(self, snapshot: Snapshot, entries: list[TensorEntry], known: Mapping[bytes, memoryview] | None = None
                    ) -> list[torch.Tensor | np.ndarray]:  # fmt: skip
        """Read and verify the given tensors of ``snapshot`` as CPU values (the caller's
        to modify); ``known`` as for ``read_buffers``.

        Raises ``IntegrityError`` naming the snapshot, the state key and the
        object at fault if any chunk (or a chunk it depends on) cannot be read.
        """
        return [as_value(b, e) for b, e in zip(self.read_buffers(snapshot, entries, known=known).writable, entries)]

    def read_buffers(
        self,
        snapshot: Snapshot,
        entries: list[TensorEntry],
        *,
        pristine: bool = False,
        only_read: Sequence[bool] | None = None,
        fetched: Future[MappedBlob] | None = None,
        known: Mapping[bytes, memoryview] | None = None,
    ) -> ReadBuffers:
        """``read_arrays``, as flat uint8 buffers (``pristine`` ones too, see
        ``ReadBuffers``). From the snapshot's warm copy when it has a sound one and
        it pays (``_warm_pays``); else from the packs, with chains stopping at the
        nearest ancestor that has a sound warm copy (``_warm_base``).

        ``only_read[i]`` says the caller will only read entry i's writable buffer
        (e.g. copy it into a module's parameters): it may then be the pristine
        buffer itself, or a copy-on-write mapping. Without ``only_read`` every
        writable buffer may be a copy-on-write mapping (pages copied when first
        written); with it, the others are copied now, so their first writes do
        not pay page by page. ``fetched``: the snapshot's warm copy, already being got
        (``prefetch_warm``). ``known``: chunks the caller holds, by id, whose bytes
        are the chunks' own (the hot tier's): read from the packs, chains stop
        there too."""
        own = None if only_read is None else [not r for r in only_read]
        warm = self._read_warm(snapshot, entries, fetched, own)
        if warm is not None:
            if own is None:
                writable = warm.private()
            else:  # copies made while verifying; what is only read stays copy-on-write pages
                lent = warm.private() if any(o is None for o in warm.owned) else []
                writable = [o if o is not None else lent[i] for i, o in enumerate(warm.owned)]
            return ReadBuffers(writable, warm.arrays if pristine else None, True)
        warm_base = self._warm_base(snapshot, entries)
        stops = ChainMap(warm_base, known) if warm_base and known else (known or warm_base)  # where chains stop
        buffers = self._read_byte_ranges(snapshot, [(e, 0, e.nbytes) for e in entries], stops)
        if not pristine:
            return ReadBuffers(buffers, None, False)
        shared = only_read or [False] * len(buffers)
        return ReadBuffers([b if r else copied(b) for b, r in zip(buffers, shared)], buffers, False)

    def _warm_pays(self, snapshot: Snapshot, entries: list[TensorEntry]) -> bool:
        """Whether reading ``entries`` of ``snapshot`` may use warm copies: a local
        backend maps them; a remote one downloads them whole, so only for at least
        half of the snapshot's bytes."""
        if not entries:
            return False
        if self.backend.capabilities.local_dir is not None:
            return True
        return 2 * sum(e.nbytes for e in entries) >= sum(e.nbytes for e in self.cached_manifest(snapshot).tensors)

    def prefetch_warm(self, snapshot_id: str) -> Future[MappedBlob] | None:
        """For a caller about to read every tensor of ``snapshot_id``: start downloading
        its warm copy now, overlapping the record reads, where the backend is remote
        (a local one maps the file when read). None where there is nothing to gain."""
        return self.warm.fetch(snapshot_id) if self.backend.capabilities.local_dir is None else None

    def _read_warm(self, snapshot: Snapshot, entries: list[TensorEntry], fetched: Future[MappedBlob] | None,
                   own: Sequence[bool] | None) -> WarmRead | None:  # fmt: skip
        if not self._warm_pays(snapshot, entries):
            return None
        return self.warm.read(snapshot, self.cached_manifest(snapshot), entries, fetched, own)

    def _warm_base(self, snapshot: Snapshot, entries: list[TensorEntry]) -> dict[bytes, memoryview]:
        """Verified chunks of the nearest first-parent ancestor that has a warm copy
        (within ``max_chain`` commits: no chain reaches further), for reading
        ``snapshot``'s chains only back to it (a head committed since its branch's
        last warm copy, e.g. after a crash under an interval cadence). Only the
        tensors at the paths of ``entries`` are verified and offered: what their
        chains need elsewhere (an optimizer moment) is read from the packs, so a
        read of one tensor does not hash the whole copy."""
        if not self._warm_pays(snapshot, entries):
            return {}
        warm = set(self.warm.snapshot_ids())
        paths = {e.path for e in entries}
        ancestors = itertools.islice(self.first_parents(snapshot.id), 1, self.config.max_chain + 1)
        for ancestor in (a for a in ancestors if a.id in warm) if warm else ():
            same_paths = [e for e in self.cached_manifest(ancestor).tensors if e.path in paths]
            read = self.warm.read(ancestor, self.cached_manifest(ancestor), same_paths)
            if read is not None:
                return {chunk_id: memoryview(array[at : at + length]) for entry, array in zip(same_paths, read.arrays)
                        for chunk_id, at, length in entry.spans()}  # fmt: skip
        return {}

    def read_bytes(self, snapshot: Snapshot, entry: TensorEntry, start: int, end: int) -> np.ndarray:
        """Bytes ``[start, end)`` of one tensor of ``snapshot``, reading (and verifying)
        only the chunks that cover them."""
        if not 0 <= start <= end <= entry.nbytes:
            raise InvalidInputError(f"byte range [{start}, {end}) is outside {entry.path!r} ({entry.nbytes} bytes)")
        return self._read_byte_ranges(snapshot, [(entry, start, end)])[0]

    def _read_byte_ranges(
        self, snapshot: Snapshot, ranges: list[tuple[TensorEntry, int, int]], known: Mapping[bytes, memoryview] | None = None
    ) -> list[np.ndarray]:
        buffers = [np.empty(end - start, dtype=np.uint8) for _, start, end in ranges]
        targets: dict[bytes, list[tuple[np.ndarray, TensorEntry, int, int, int]]] = {}
        for buffer, (entry, start, end) in zip(buffers, ranges):
            for chunk_id, offset, length in entry.spans():
                if offset < end and offset + length > start:
                    targets.setdefault(chunk_id, []).append((buffer, entry, offset - start, length, end - start))

        def place(chunk_id: bytes, raw: Raw) -> None:
            data = np.frombuffer(raw, dtype=np.uint8)
            for buffer, entry, at, length, size in targets[chunk_id]:
                if len(raw) != length:
                    raise IntegrityError(
                        f"snapshot {snapshot.short_id}, state key {entry.path!r}: "
                        f"chunk {chunk_id.hex()} has {len(raw)} bytes, manifest expects {length}"
                    )
                lo, hi = max(at, 0), min(at + length, size)  # the part of the chunk inside the range
                buffer[lo:hi] = data[lo - at : hi - at]

        errors = self.reader.read(targets, place, known=known)
        if errors:
            chunk_id, error = next(iter(errors.items()))
            raise IntegrityError(f"snapshot {snapshot.short_id}, state key {targets[chunk_id][0][1].path!r}: {error}") from error
        return buffers


def checked_ref(ref: str, value: str) -> str:
    """``value`` if it is a full snapshot id, else ``IntegrityError`` naming the ref."""
    if not ID_HEX.fullmatch(value):
        raise IntegrityError(f"ref {ref} is damaged: it holds {value[:48]!r}, not a snapshot id (repair it with reset)")
    return value


def as_value(buffer: np.ndarray | torch.Tensor, entry: TensorEntry) -> torch.Tensor | np.ndarray:
    """A flat byte buffer (host memory, or a device tensor's bytes) as the tensor (or
    numpy array) ``entry`` describes, sharing its memory."""
    if isinstance(buffer, torch.Tensor):
        return buffer.view(torch_dtype(entry.dtype)).reshape(entry.shape)
    if entry.kind == "ndarray":
        return buffer.view(numpy_dtype(entry.dtype)).reshape(entry.shape)
    if buffer.size == 0:  # from_numpy gives empty tensors stride 0, which cannot be re-viewed
        return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
    return torch.from_numpy(buffer).view(torch_dtype(entry.dtype)).reshape(entry.shape)


def is_whole(value: object, low: int, high: float = math.inf) -> bool:
    """``value`` is an ``int`` (not a bool) in ``[low, high]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def new_config(chunk_size: int, compression_level: int, max_chain: int) -> RepositoryConfig:
    """A config for a new repository, with its settings checked (``InvalidInputError``)."""
    if not is_whole(chunk_size, 64) or chunk_size % 64:
        raise InvalidInputError(f"chunk_size must be a positive multiple of 64 bytes, got {chunk_size!r}")
    if not is_whole(compression_level, 1, 19):
        raise InvalidInputError(f"compression_level must be 1..19, got {compression_level!r}")
    if not is_whole(max_chain, 1, 255):
        raise InvalidInputError(f"max_chain must be 1..255, got {max_chain!r}")
    return RepositoryConfig(uuid.uuid4().hex, chunk_size, compression_level, max_chain=max_chain)


__all__ = ["REPOSITORY_VERSION", "ReadBuffers", "RepositoryConfig", "Store", "Transaction", "as_value", "is_whole", "new_config"]
