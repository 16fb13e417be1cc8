"""History: the snapshots reachable from some heads, newest first."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from qckpt.format.records import Snapshot
from qckpt.store.store import Store


def history(store: Store, heads: Iterable[Snapshot], limit: int | None = None) -> list[Snapshot]:
    """Snapshots reachable from ``heads`` through all parents, newest first (at most
    ``limit``). Snapshots expired by garbage collection end their line of history."""
    heap: list[tuple[float, str]] = []
    seen: set[str] = set()

    def push(snap: Snapshot | None) -> None:
        if snap is not None and snap.id not in seen:
            seen.add(snap.id)
            heapq.heappush(heap, (-snap.time, snap.id))

    for head in heads:
        push(head)
    out: list[Snapshot] = []
    while heap and (limit is None or len(out) < limit):
        snap = store.snapshot(heapq.heappop(heap)[1])
        out.append(snap)
        for parent in snap.parents:
            if parent not in seen:
                push(store.stored_snapshot(parent))
    return out
