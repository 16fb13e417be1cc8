"""When branch heads get a warm copy, and replacing the old one.

``WarmCadence`` runs on the repository's writer thread only. After each
commit (``committed``) it writes the new head's warm copy if the branch's last
one is at least ``interval_s`` old (0: every commit), from the bytes just
committed; otherwise it remembers the head, and ``catch_up`` (called by
``Repository.flush`` and ``close``) writes it later. After writing a copy it
deletes the copies it replaces: the branch's previous one and those of the
new snapshot's parents, unless one is still some branch's head or kept
(``keep``: a light cone's rollback window); a head committed without a copy
(``warm=False``) deletes only the branch's previous copy written here. A kept
copy that was replaced meanwhile is deleted at its last ``release``. Deleting is
always safe (a warm copy is a cache), so a crash between the write and the
deletes only leaves a stale copy, which garbage collection removes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from qckpt.commit.hot import HotTier
from qckpt.format.records import Snapshot, TensorEntry
from qckpt.store.layout import BRANCH_PREFIX
from qckpt.store.store import Store


class WarmCadence:
    """Warm copies of the branches this repository commits to (see the module docstring).
    ``interval_s``: at least this long between two copies of one branch, and from
    opening to the first (0: every commit; ``math.inf``: only on ``catch_up``).
    Writer thread only."""

    def __init__(self, store: Store, hot: HotTier, interval_s: float) -> None:
        self._store = store
        self._hot = hot
        self.interval_s = interval_s
        self._opened = time.monotonic()
        self._last: dict[str, float] = {}  # branch -> time.monotonic() of its last copy (else: of opening)
        self._written: dict[str, str] = {}  # branch -> the snapshot whose copy this repository wrote last
        self.pending: dict[str, Snapshot] = {}  # branch -> its newest head still without a copy
        self.bytes_written = 0
        self._kept: Counter[str] = Counter()  # snapshots whose copies are not deleted when replaced (see ``keep``)
        self._replaced: set[str] = set()  # kept ones replaced meanwhile: deleted at their last release

    def keep(self, snapshot_id: str) -> None:
        """Do not delete ``snapshot_id``'s copy (if it has one) when it is replaced,
        until as many ``release`` calls."""
        self._kept[snapshot_id] += 1

    def release(self, snapshot_id: str) -> None:
        """Undo one ``keep``; at the last, a copy that was replaced meanwhile is deleted
        now, unless its snapshot is some branch's head again."""
        self._kept[snapshot_id] -= 1
        if self._kept[snapshot_id] <= 0:
            del self._kept[snapshot_id]
            if snapshot_id in self._replaced:
                self._replaced.discard(snapshot_id)
                self._delete({snapshot_id})

    def committed(self, branch: str, snapshot: Snapshot, entries: Sequence[TensorEntry], arrays: Mapping[str, np.ndarray],
                  wanted: bool = True) -> None:  # fmt: skip
        """``snapshot`` (listing ``entries``, whose bytes ``arrays`` holds by path) is
        the new head of ``branch``: write its warm copy if one is due (never if not
        ``wanted``; then only delete the copies it replaces)."""
        since = time.monotonic() - self._last.get(branch, self._opened)
        if not wanted:
            self.pending.pop(branch, None)
            self._replace(branch, snapshot, copied=False)
        elif self.interval_s == 0 or since >= self.interval_s:
            self._write(branch, snapshot, entries, arrays)
        else:
            self.pending[branch] = snapshot

    def catch_up(self) -> None:
        """Write the copies that are still due, for heads nobody moved since: from
        the hot tier when the head is there, else read back from the packs."""
        for branch, snapshot in list(self.pending.items()):
            if self._store.read_ref(BRANCH_PREFIX + branch) != snapshot.id:
                del self.pending[branch]  # moved by someone else: that head is theirs to warm
                continue
            entries = list(self._store.cached_manifest(snapshot).tensors)
            hot = self._hot.get(snapshot.id)
            if hot is not None and all(e.path in hot.arrays for e in entries):
                arrays = {e.path: hot.arrays[e.path].data for e in entries}
            else:
                arrays = dict(zip((e.path for e in entries), self._store.read_buffers(snapshot, entries).writable))
            self._write(branch, snapshot, entries, arrays)

    def _write(self, branch: str, snapshot: Snapshot, entries: Sequence[TensorEntry], arrays: Mapping[str, np.ndarray]) -> None:
        self.bytes_written += self._store.warm.write(snapshot, entries, arrays)
        self._last[branch] = time.monotonic()
        self.pending.pop(branch, None)
        self._replace(branch, snapshot, copied=True)

    def _replace(self, branch: str, snapshot: Snapshot, *, copied: bool) -> None:
        """Delete the copies ``snapshot`` (the new head of ``branch``) replaces, unless
        one is still some branch's head or kept: the branch's previous one written
        here, and, if ``snapshot`` got a copy, its parents' (a head without one
        deletes only copies known to exist: no request for the others, which GC
        collects)."""
        previous = self._written.pop(branch, None)
        replaced = {s for s in (*(snapshot.parents if copied else ()), previous) if s is not None and s != snapshot.id}
        if copied:
            self._written[branch] = snapshot.id
        self._replaced |= replaced & self._kept.keys()
        self._delete(replaced - self._kept.keys())

    def _delete(self, replaced: set[str]) -> None:
        """Delete the copies of ``replaced`` that are no branch's head."""
        if replaced:
            heads = set(self._store.backend.list_refs(BRANCH_PREFIX).values())  # damaged refs are not our concern here
            for snapshot_id in replaced - heads:
                self._store.warm.delete(snapshot_id)


__all__ = ["WarmCadence"]
