"""fsck: verify everything reachable and say precisely what is damaged and whom it affects."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from qckpt.errors import IntegrityError, ObjectNotFoundError, RevisionNotFoundError
from qckpt.format.records import RefLogEntry, Snapshot
from qckpt.format.ids import hex_id
from qckpt.store.layout import BRANCH_PREFIX, REFLOG_PREFIX, TAG_PREFIX, pack_key
from qckpt.store.store import Store, checked_ref

_MAX_AFFECTED = 20


@dataclass(frozen=True)
class FsckProblem:
    """One damaged thing (``subject``), why (``error``), and what depends on it."""

    subject: str
    error: str
    affects: tuple[str, ...] = ()


@dataclass
class FsckReport:
    """Counts of what was verified and every problem found."""

    refs: int = 0
    snapshots: int = 0
    chunks: int = 0
    packs: int = 0
    warm_copies: int = 0
    problems: list[FsckProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_repository(store: Store, progress: Callable[[str, int, int], None] | None = None) -> FsckReport:
    """Verify refs, ref log records, every snapshot reachable from the refs (parents
    expired by GC end a line of history, they are not damage), their manifests, the
    digest of every chunk they reference, every pack against its id and the index,
    and every warm copy against its snapshot's manifest."""
    report_progress = progress or (lambda stage, done, total: None)
    report = FsckReport()
    store.forget_expired()
    refs: dict[str, str] = {}
    for ref, value in {**store.backend.list_refs(BRANCH_PREFIX), **store.backend.list_refs(TAG_PREFIX)}.items():
        try:
            refs[ref] = checked_ref(ref, value)
        except IntegrityError as e:
            report.problems.append(FsckProblem(f"ref {ref}", str(e)))
    report.refs = len(refs) + len(report.problems)
    recorded: list[tuple[str, str, bool]] = []  # what the ref log can bring back is checked too, if still stored
    for key in store.backend.list(REFLOG_PREFIX):  # ref log records protect what mistakes left behind
        try:
            entry = RefLogEntry.from_bytes(key, store.backend.get(key))
        except IntegrityError as e:
            report.problems.append(FsckProblem(f"ref log record {key}", str(e), ("garbage collection (it refuses until repaired)",)))
            continue
        recorded += [(i, f"the ref log of {entry.ref}", False) for i in (entry.old, entry.new) if i and i not in refs.values()]

    snapshots: dict[str, Snapshot] = {}
    visited: set[str] = set()
    pending = recorded + [(target, ref, True) for ref, target in refs.items()]  # (id, reached from, is the ref target)
    while pending:
        snapshot_id, via, direct = pending.pop()
        if snapshot_id in visited:
            continue
        visited.add(snapshot_id)
        try:
            snap = store.snapshot(snapshot_id)
        except RevisionNotFoundError:
            if direct:  # a ref must point at a stored snapshot; parents may have been expired by GC
                report.problems.append(FsckProblem(f"ref {via}", f"points at missing snapshot {snapshot_id}"))
            continue
        except IntegrityError as e:
            report.problems.append(FsckProblem(f"snapshot {snapshot_id}", str(e), (f"reachable from {via}",)))
            continue
        snapshots[snapshot_id] = snap
        pending.extend((p, via, False) for p in snap.parents)
    report.snapshots = len(snapshots)

    users: dict[bytes, list[str]] = defaultdict(list)
    for snap in snapshots.values():
        try:
            manifest = store.manifest(snap)
        except IntegrityError as e:
            report.problems.append(FsckProblem(f"manifest {snap.manifest}", str(e), (f"snapshot {snap.short_id}",)))
            continue
        for entry in manifest.tensors:
            for chunk_id in entry.chunks:
                users[chunk_id].append(f"snapshot {snap.short_id} key {entry.path!r}")
    report.chunks = len(users)

    verified = 0
    lock = threading.Lock()

    def count(chunk_id: bytes, raw: bytes) -> None:
        nonlocal verified
        with lock:
            verified += 1
            report_progress("verifying chunks", verified, len(users))

    errors = store.reader.read(list(users), count)

    def damaged_root(chunk_id: bytes) -> bytes:
        """The damaged object an unreadable one is unreadable because of (itself if none)."""
        location = store.locate(chunk_id)
        broken = next((d for d in (location.deps if location else ()) if d in errors), None)
        return chunk_id if broken is None else damaged_root(broken)

    affected_by: dict[bytes, list[str]] = defaultdict(list)  # one problem per damaged object, with all it affects
    for chunk_id in users:
        if chunk_id in errors:
            root = damaged_root(chunk_id)
            via = "" if root == chunk_id else f" (through object {chunk_id.hex()}, predicted from it)"
            affected_by[root] += [user + via for user in users[chunk_id]]
    for chunk_id, affected in affected_by.items():
        more = [f"... and {len(affected) - _MAX_AFFECTED} more"] if len(affected) > _MAX_AFFECTED else []
        report.problems.append(
            FsckProblem(f"object {chunk_id.hex()}", str(errors[chunk_id]), tuple(affected[:_MAX_AFFECTED] + more))
        )

    for snapshot_id in store.warm.snapshot_ids():  # a cache: damage costs speed (restores read the packs), never data
        report.warm_copies += 1
        snap = snapshots.get(snapshot_id)
        if snap is None:
            continue  # a stale copy (its snapshot is unreachable, expired or damaged): garbage, which GC removes
        try:
            manifest = store.manifest(snap)
        except IntegrityError:
            continue  # reported above
        try:
            store.warm.verify(snap, manifest)
        except ObjectNotFoundError:
            continue  # replaced meanwhile
        except IntegrityError as e:
            report.problems.append(FsckProblem(
                f"warm copy of snapshot {snap.short_id}", str(e),
                (f"restores of snapshot {snap.short_id} read its packs instead (slower); the next commit on its branch replaces it",),
            ))  # fmt: skip

    pack_ids = store.pack_ids()
    report.packs = len(pack_ids)
    for n, problem in enumerate(store.pool.map(lambda p: _check_pack(store, p), pack_ids)):
        report_progress("verifying packs", n + 1, len(pack_ids))
        if problem is not None:
            report.problems.append(problem)
    return report


def _check_pack(store: Store, pack_id: str) -> FsckProblem | None:
    """A pack's bytes against its id, and its footer against the chunk index."""
    try:
        data = store.backend.get(pack_key(pack_id))
        if hex_id(data) != pack_id:
            raise IntegrityError(f"pack {pack_id} is damaged: its content does not match its id")
        contents = store.pack_contents(pack_id)
    except IntegrityError as e:
        return FsckProblem(f"pack {pack_id}", str(e))
    disagree = [(c, loc, store.index.get(c)) for c, loc in contents.items()]
    disagree = [(c, loc, idx) for c, loc, idx in disagree if idx is not None and idx.pack_id == pack_id and idx != loc]
    if disagree:
        chunk_id, footer, indexed = disagree[0]
        return FsckProblem(
            f"pack {pack_id}",
            f"its footer disagrees with the chunk index on {len(disagree)} objects, e.g. {chunk_id.hex()} "
            f"(footer: offset {footer.offset}, length {footer.length}; index: offset {indexed.offset}, "  # type: ignore[union-attr]
            f"length {indexed.length})",  # type: ignore[union-attr]
        )
    return None
