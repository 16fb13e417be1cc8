"""Space per branch: what each branch's history holds that nothing else needs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from qckpt.ops.log import history
from qckpt.store.store import Store


@dataclass(frozen=True)
class BranchUsage:
    """One branch's history: ``snapshots`` in it, ``raw_bytes`` of their states, and
    ``exclusive_bytes``/``exclusive_objects``: stored objects that no other branch's
    or tag's history needs (directly or as a delta base) — what deleting the branch
    frees once GC runs after the ref log's grace period."""

    snapshots: int
    raw_bytes: int
    exclusive_objects: int
    exclusive_bytes: int


def branch_usage(store: Store) -> dict[str, BranchUsage]:
    """``BranchUsage`` for every branch, by name (reads every reachable manifest once)."""
    heads = {f"heads/{n}": i for n, i in store.branches().items()} | {f"tags/{n}": i for n, i in store.tags().items()}
    histories = {ref: history(store, [store.snapshot(head)]) for ref, head in heads.items()}
    chunks_of_manifest: dict[str, frozenset[bytes]] = {}
    needed: dict[str, set[bytes]] = {}
    for ref, snaps in histories.items():
        chunks: set[bytes] = set()
        for snap in snaps:
            if snap.manifest not in chunks_of_manifest:
                manifest = store.manifest_by_id(snap.manifest)
                chunks_of_manifest[snap.manifest] = frozenset(c for t in manifest.tensors for c in t.chunks)
            chunks |= chunks_of_manifest[snap.manifest]
        needed[ref] = chunks
    if any(store.locate(c) is None for chunks in needed.values() for c in chunks):
        store.rescan_packs()  # a fresh index cache: read where the objects are from the packs
    needed = {ref: _with_bases(store, chunks) for ref, chunks in needed.items()}
    holders = Counter(c for chunks in needed.values() for c in chunks)
    usage = {}
    for ref, snaps in histories.items():
        if ref.startswith("heads/"):
            own = [c for c in needed[ref] if holders[c] == 1]
            sizes = [location.length for location in map(store.locate, own) if location is not None]
            usage[ref.removeprefix("heads/")] = BranchUsage(len(snaps), sum(s.stats.raw_bytes for s in snaps), len(own), sum(sizes))
    return usage


def _with_bases(store: Store, chunks: set[bytes]) -> set[bytes]:
    """``chunks`` and every object they are predicted from, transitively."""
    closure, stack = set(chunks), list(chunks)
    while stack:
        location = store.locate(stack.pop())
        for dep in location.deps if location is not None else ():
            if dep not in closure:
                closure.add(dep)
                stack.append(dep)
    return closure
