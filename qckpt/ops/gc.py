"""Retention and garbage collection.

Planning is pure: ``plan_retention`` decides which snapshots to keep from the
snapshot graph, refs and a policy. ``collect_garbage`` then, holding the
exclusive writer lock (commits hold it shared, so none is in flight), deletes
what nothing kept needs, in an order that is safe to interrupt:

1. repack partly dead packs and packs holding deferred objects (a compaction
   that never came): copy live objects verbatim into new packs, deferred ones
   compressed on their own, and point the index at them;
2. remove index entries of dead chunks (so no later commit dedups against them);
3. delete warm copies of snapshots that are no branch's head (a head's warm
   parts stay, see ``Snapshot.warm_parts``), expired snapshot records and
   manifests that no kept snapshot lists (as its manifest or a part);
4. delete dead and repacked packs.

A crash at any point leaves at worst extra garbage for the next run, never an
index entry or a manifest pointing at a deleted object.

Liveness follows dependencies: a chunk is live if a kept snapshot's manifest
lists it, or a live chunk is predicted from it (transitively). Dependencies
are taken from the pack footers, read in full by every collection, so chunks
written by other machines since this index was built are covered too. An
expired snapshot's chunks therefore stay as long as a kept chunk's chain
passes through them (at most ``max_chain - 1`` snapshots back).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from qckpt.errors import IntegrityError, InvalidInputError
from qckpt.format.codecs import DeferredCodec, Raw
from qckpt.format.objects import encode_again_on_its_own
from qckpt.format.packs import ChunkLocation, PackBuilder
from qckpt.format.records import Snapshot
from qckpt.store.layout import BRANCH_PREFIX, GC_GENERATION_REF, TAG_PREFIX, manifest_key, pack_key, snapshot_key
from qckpt.store.reader import ChunkReader
from qckpt.store.store import Store

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RetentionPolicy:
    """Which snapshots garbage collection keeps.

    With no rule set, every snapshot reachable from a branch or tag is kept
    (deleting a branch is what frees space). With rules, a snapshot is kept if
    it is a branch head, tagged (``keep_tagged``), or selected by any rule among
    the history of some branch: the newest ``keep_last``, the best
    ``keep_best_k`` by metric ``keep_best`` (``keep_best_mode`` ``min``/``max``),
    or those newer than ``keep_newer_than`` seconds. Every other snapshot expires;
    with ``keep_tagged=False`` a tag whose snapshot expires is deleted with it.

    A snapshot a ref left by a rewinding change (a reset elsewhere, a deleted
    branch) is treated like a branch head for ``reflog_grace`` seconds after the
    change (default 7 days), so mistakes stay recoverable; 0 turns this off.
    A ``keep_best`` metric that no snapshot records is an error, not a silent
    "keep nothing".
    """

    keep_last: int | None = None
    keep_best: str | None = None
    keep_best_k: int = 1
    keep_best_mode: str = "min"
    keep_newer_than: float | None = None
    keep_tagged: bool = True
    reflog_grace: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise InvalidInputError(f"keep_last must be at least 1, got {self.keep_last}")
        if self.keep_best_k < 1 or self.keep_best_mode not in ("min", "max"):
            raise InvalidInputError("keep_best_k must be >= 1 and keep_best_mode 'min' or 'max'")
        if self.keep_newer_than is not None and self.keep_newer_than < 0:
            raise InvalidInputError("keep_newer_than must be a non-negative number of seconds")
        if self.reflog_grace < 0:
            raise InvalidInputError("reflog_grace must be a non-negative number of seconds")

    @property
    def expires(self) -> bool:
        """Whether any rule limits history (otherwise all reachable history is kept)."""
        return self.keep_last is not None or self.keep_best is not None or self.keep_newer_than is not None


def _ancestors(heads: Iterable[str], snapshots: Mapping[str, Snapshot]) -> list[Snapshot]:
    """Stored snapshots reachable from ``heads`` through parents, newest first."""
    seen: set[str] = set()
    stack = [h for h in heads if h in snapshots]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(p for p in snapshots[current].parents if p in snapshots)
    return sorted((snapshots[i] for i in seen), key=lambda s: -s.time)


def plan_retention(
    snapshots: Mapping[str, Snapshot],
    branches: Mapping[str, str],
    tags: Mapping[str, str],
    policy: RetentionPolicy,
    now: float,
    protected: Iterable[str] = (),
) -> set[str]:
    """Ids of the snapshots to keep (see ``RetentionPolicy``); ``protected`` are kept
    like branch heads (the ref log's rewound snapshots within the grace period)."""
    if policy.keep_best is not None:
        recorded = sorted({name for s in snapshots.values() for name in s.metrics})
        if policy.keep_best not in recorded:
            raise InvalidInputError(
                f"no snapshot records metric {policy.keep_best!r} (recorded: {', '.join(recorded) or 'none'}); "
                "nothing was deleted"
            )
    branches = {**branches, **{f"reflog:{i}": i for i in protected}}
    if not policy.expires:
        return {s.id for s in _ancestors([*branches.values(), *tags.values()], snapshots)}
    keep = {h for h in branches.values() if h in snapshots}
    if policy.keep_tagged:
        keep |= {t for t in tags.values() if t in snapshots}
    for head in branches.values():
        history = _ancestors([head], snapshots)
        if policy.keep_last is not None:
            keep |= {s.id for s in history[: policy.keep_last]}
        if policy.keep_newer_than is not None:
            keep |= {s.id for s in history if s.time >= now - policy.keep_newer_than}
        if policy.keep_best is not None:
            scored = [s for s in history if isinstance(s.metrics.get(policy.keep_best), (int, float))
                      and s.metrics[policy.keep_best] == s.metrics[policy.keep_best]]  # fmt: skip
            scored.sort(key=lambda s: s.metrics[policy.keep_best], reverse=policy.keep_best_mode == "max")
            keep |= {s.id for s in scored[: policy.keep_best_k]}
    return keep


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection removed (or, with ``dry_run``, would remove)."""

    snapshots_kept: int
    snapshots_deleted: int
    manifests_deleted: int
    packs_deleted: int
    packs_repacked: int
    chunks_deleted: int
    bytes_before: int
    bytes_after: int
    dry_run: bool
    expired: tuple[Snapshot, ...] = ()  # the snapshots deleted (or that would be), newest first
    warm_copies_deleted: int = 0  # warm copies of snapshots that are no branch's head (left by crashes, moved heads)


def _footer_for_gc(store: Store) -> Callable[[str], dict[bytes, ChunkLocation]]:
    def footer(pack_id: str) -> dict[bytes, ChunkLocation]:
        try:
            return store.pack_contents(pack_id)
        except IntegrityError as e:  # liveness cannot be judged without every footer
            raise IntegrityError(f"garbage collection stopped before deleting anything: {e}; run fsck") from e

    return footer


def collect_garbage(
    store: Store,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    repack_threshold: float = 0.2,
    progress: Progress | None = None,
) -> GcReport:
    """Expire snapshots by ``policy`` and delete every object no kept snapshot needs.

    Packs whose dead fraction (by bytes) reaches ``repack_threshold``, and packs
    holding live deferred objects, are rewritten with only their live objects
    (each verified on the way; deferred ones compressed on their own).
    """
    report = progress or (lambda stage, done, total: None)
    backend = store.backend
    with backend.lock(exclusive=True) as lease:
        store.sync_index()  # the index must reflect earlier collections before we judge liveness
        bytes_before = store.stored_bytes()
        snapshots = {i: store.snapshot(i) for i in store.snapshot_ids()}
        now = time.time()
        protected = {e.old for e in store.reflog(rewinding_since=now - policy.reflog_grace) if e.old}
        branches, tags = store.branches(), store.tags()
        dangling = [(f"{kind} {name}", target) for kind, refs in (("branch", branches), ("tag", tags))
                    for name, target in refs.items() if target not in snapshots]  # fmt: skip
        if dangling:  # a damaged ref: the history it held would look unreferenced
            where, target = dangling[0]
            raise IntegrityError(
                f"garbage collection stopped before deleting anything: {where} points at snapshot {target}, "
                "which does not exist (a damaged ref?); repair it with reset (qckpt reflog shows where it was)"
            )
        keep = plan_retention(snapshots, branches, tags, policy, now, protected)
        live_manifests = {snapshots[i].manifest for i in keep}
        parts = {i: snapshots[i].warm_parts for i in keep}  # part manifests list only chunks their snapshot lists
        live_chunks: set[bytes] = set()
        for n, manifest_id in enumerate(sorted(live_manifests)):
            live_chunks.update(c for t in store.manifest_by_id(manifest_id).tensors for c in t.chunks)
            report("marking", n + 1, len(live_manifests))

        pack_ids = store.pack_ids()
        footers: dict[str, dict[bytes, ChunkLocation]] = {}
        canonical_of: dict[bytes, ChunkLocation] = {}
        for n, (pack_id, contents) in enumerate(zip(pack_ids, store.pool.map(_footer_for_gc(store), pack_ids))):
            report("scanning packs", n + 1, len(pack_ids))
            footers[pack_id] = contents
            for chunk_id, location in contents.items():
                indexed = store.index.get(chunk_id)
                if indexed is not None and indexed.pack_id == pack_id and indexed != location:
                    raise IntegrityError(  # never judge liveness (and delete the only copy) on a damaged footer's word
                        f"garbage collection stopped before deleting anything: the footer of pack {pack_id} places "
                        f"object {chunk_id.hex()} at offset {location.offset}, the chunk index at {indexed.offset}; "
                        "run fsck"
                    )
                if chunk_id not in canonical_of:
                    canonical = indexed
                    if canonical is None:  # index behind this pack: adopt its copy
                        if not dry_run:
                            store.index.put_many({chunk_id: location})
                        canonical = location
                    canonical_of[chunk_id] = canonical
        for chunk_id in live_chunks:
            indexed = store.index.get(chunk_id) if chunk_id not in canonical_of else None
            if indexed is not None:  # a live object the footers do not list: one of them is damaged
                raise IntegrityError(
                    f"garbage collection stopped before deleting anything: object {chunk_id.hex()} is needed by a "
                    f"kept snapshot and the chunk index places it in pack {indexed.pack_id}, but no pack footer "
                    "lists it; run fsck"
                )
        stack = list(live_chunks)
        while stack:  # what live chunks are predicted from is live too
            location = canonical_of.get(stack.pop())
            for dep in location.deps if location is not None else ():
                if dep not in live_chunks:
                    live_chunks.add(dep)
                    stack.append(dep)

        dead_packs: list[str] = []
        repacks: dict[str, list[tuple[bytes, ChunkLocation]]] = {}
        dead_chunks: set[bytes] = set()
        for pack_id, contents in footers.items():
            live, dead_bytes, total_bytes = [], 0, 0
            for chunk_id, location in contents.items():
                canonical = canonical_of[chunk_id]
                total_bytes += location.length
                if chunk_id in live_chunks and canonical == location:
                    live.append((chunk_id, location))
                else:
                    dead_bytes += location.length
                    if canonical == location:
                        dead_chunks.add(chunk_id)
            if not live:
                dead_packs.append(pack_id)
            elif (total_bytes and dead_bytes / total_bytes >= repack_threshold) or any(
                    location.codec == DeferredCodec.id for _, location in live):  # fmt: skip
                repacks[pack_id] = live  # a deferred object's compaction never came: it is compressed on its own

        expired = [i for i in snapshots if i not in keep]
        expired_snaps = tuple(sorted((snapshots[i] for i in expired), key=lambda s: -s.time))
        part_manifests = {p for ids in parts.values() for p in ids}
        dead_manifests = [manifest_key(m) for m in store.manifest_ids() if m not in live_manifests | part_manifests]
        # heads read after listing: a copy is written after its head's ref, so a current head's copy is never judged stale
        warm = store.warm.snapshot_ids()
        heads = set(backend.list_refs(BRANCH_PREFIX).values())
        heads |= {p for head in heads for p in parts.get(head, ())}  # the warm parts of a head are its warm copy
        stale_warm = [i for i in warm if i not in heads]
        if dry_run:
            freed = sum(backend.size(pack_key(p)) for p in dead_packs)
            freed += sum(backend.size(snapshot_key(i)) for i in expired) + sum(backend.size(k) for k in dead_manifests)
            freed += sum(backend.size(pack_key(p)) - sum(loc.length for _, loc in live) for p, live in repacks.items())
            return GcReport(len(keep), len(expired), len(dead_manifests), len(dead_packs), len(repacks),
                            len(dead_chunks), bytes_before, bytes_before - freed, True, expired_snaps, len(stale_warm))  # fmt: skip

        lease.check()  # from here on objects are deleted: only under a lock others still honour
        generation = uuid.uuid4().hex  # tells other repositories' index caches to rebuild
        backend.swap_ref(GC_GENERATION_REF, store.index.generation(), generation)
        for n, (pack_id, live) in enumerate(repacks.items()):  # 1. repack
            report("repacking", n + 1, len(repacks))
            # a reader of the index as GC keeps it, never of an earlier scan
            reader = ChunkReader(backend, store.index.get, store.pool, store.compute)
            deferred: dict[bytes, Raw] = {}  # their raw bytes, as read (and verified)
            wanted = {c for c, location in live if location.codec == DeferredCodec.id}
            damaged = reader.read([c for c, _ in live], functools.partial(_keep, wanted, deferred))
            if damaged:  # never copy a damaged object forward
                chunk_id, error = next(iter(damaged.items()))
                raise IntegrityError(f"garbage collection stopped before repacking pack {pack_id}: {error}")
            builder = PackBuilder()
            for chunk_id, location in live:
                obj = backend.get_range(pack_key(pack_id), location.offset, location.length)
                if chunk_id in deferred:
                    again = encode_again_on_its_own(obj, deferred[chunk_id], store.config.compression_level)
                    builder.add(chunk_id, again.codec, again.data)
                else:
                    builder.add(chunk_id, location.codec, obj, location.depth, location.deps)
            store.index.put_many(store.put_pack(builder))
        lease.check()
        store.index.remove_many(dead_chunks)  # 2. forget dead chunks
        for snapshot_id in stale_warm:  # 3. stale warm copies, tags of expired snapshots, then records
            store.warm.delete(snapshot_id)
        for name, target in store.tags().items():
            if target not in keep:
                store.delete_ref(TAG_PREFIX, name, "tag", cause="gc: its snapshot expired")
        for snapshot_id in expired:
            backend.delete(snapshot_key(snapshot_id))
            store.forget_snapshot(snapshot_id)
        for key in dead_manifests:
            backend.delete(key)
        for pack_id in [*dead_packs, *repacks]:  # 4. packs
            backend.delete(pack_key(pack_id))
        store.index.set_generation(generation)
        return GcReport(len(keep), len(expired), len(dead_manifests), len(dead_packs), len(repacks),
                        len(dead_chunks), bytes_before, store.stored_bytes(), False, expired_snaps, len(stale_warm))  # fmt: skip


def _keep(wanted: set[bytes], into: dict[bytes, Raw], chunk_id: bytes, raw: Raw) -> None:
    """A ``ChunkReader`` delivery that keeps the ``wanted`` chunks' bytes."""
    if chunk_id in wanted:
        into[chunk_id] = raw
