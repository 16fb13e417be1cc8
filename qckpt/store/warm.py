"""Warm copies: a branch head's tensors stored raw, so restoring it decodes nothing.

The warm copy of snapshot S lives at ``warm/<S>`` (format in
``qckpt.format.warm``). It is a cache in every sense: every snapshot restores
from its packs without it, so deleting one is always safe, and one that fails
verification is skipped (with a warning) for the packs. Every read checks
the trailer against the snapshot's manifest and hashes every chunk against
the id the manifest lists before a byte is used (invariant 4), so a warm
copy can make a restore fast but never wrong.

Thread-safe; knows nothing of branches or cadence (the layers above decide
when to write and replace copies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from qckpt.backends import Backend, MappedBlob
from qckpt.errors import IntegrityError, ObjectNotFoundError
from qckpt.format.records import Manifest, Snapshot, TensorEntry
from qckpt.format.warm import WARM_TRAILER_SIZE, build_warm, check_warm_trailer, verify_warm
from qckpt.store.layout import WARM_PREFIX, warm_key

_log = logging.getLogger("qckpt")


@dataclass(frozen=True)
class WarmRead:
    """Verified bytes of some tensors of a snapshot, from its warm copy: ``arrays``
    (flat uint8, one per entry asked for, read-only: never written by anyone),
    ``owned`` (for the entries the reader asked to own, a writable copy of their
    own, made while verifying; None for the others) and ``private()``, writable
    arrays with the same bytes (copy-on-write mappings on local disk, so nothing
    is copied until a page is written: ``mapped``; else copies of the whole copy)."""

    arrays: list[np.ndarray]
    owned: list[np.ndarray | None]
    private: Callable[[], list[np.ndarray]]
    mapped: bool


def _arrays(buffer: memoryview, offsets: Sequence[int], entries: Sequence[TensorEntry]) -> list[np.ndarray]:
    return [
        np.frombuffer(buffer, dtype=np.uint8, count=e.nbytes, offset=o) if e.nbytes else np.empty(0, dtype=np.uint8)
        for e, o in zip(entries, offsets)
    ]


class WarmCopies:
    """Reads, writes, lists and deletes the warm copies on ``backend``; ``pool``
    hashes chunks in parallel."""

    def __init__(self, backend: Backend, pool: Executor) -> None:
        self._backend = backend
        self._pool = pool

    def write(self, snapshot: Snapshot, entries: Sequence[TensorEntry], arrays: Mapping[str, np.ndarray]) -> int:
        """Store the warm copy of ``snapshot`` (whose manifest lists ``entries``; ``arrays``
        holds their raw bytes by path, as committed). Returns the bytes written."""
        return self._write(snapshot.id, snapshot.manifest, entries, arrays)

    def write_part(self, manifest_id: str, entries: Sequence[TensorEntry], arrays: Mapping[str, np.ndarray]) -> int:
        """Store a warm part: the warm copy of a part manifest (``manifest_id``, listing
        ``entries``), at ``warm/<manifest_id>``. One writer of a snapshot written by
        several processes (a ``torch.distributed.checkpoint`` rank) writes the part
        of the tensors it wrote; the snapshot names its parts in its annotations."""
        return self._write(manifest_id, manifest_id, entries, arrays)

    def _write(self, name: str, manifest_id: str, entries: Sequence[TensorEntry], arrays: Mapping[str, np.ndarray]) -> int:
        parts = build_warm(manifest_id, entries, arrays)
        self._backend.put_cache(warm_key(name), parts)  # a cache: no fsync (a torn copy fails verification)
        return sum(p.nbytes for p in parts)

    def read(
        self,
        snapshot: Snapshot,
        manifest: Manifest,
        wanted: Sequence[TensorEntry],
        fetched: Future[MappedBlob] | None = None,
        own: Sequence[bool] | None = None,
    ) -> WarmRead | None:
        """The ``wanted`` tensors of ``snapshot`` from its warm copy (``fetched``, if
        ``fetch`` started getting it), verified; None if it has none, or if the copy is
        damaged (logged: the caller reads the packs). ``own[i]``: wanted entry i gets
        a writable copy of its own (``WarmRead.owned``), made in the verifying pass;
        from a copy that is not mapped (a download, whose ``private()`` would copy
        all of it) every entry gets one when ``own`` is given."""
        return self._read(snapshot.id, snapshot.manifest, manifest, wanted, fetched, own)

    def read_part(self, manifest_id: str, manifest: Manifest, wanted: Sequence[TensorEntry]) -> WarmRead | None:
        """The ``wanted`` tensors from the warm part of manifest ``manifest_id`` (see
        ``write_part``), verified as ``read`` verifies; None if missing or damaged."""
        return self._read(manifest_id, manifest_id, manifest, wanted, None, None)

    def _read(self, name: str, manifest_id: str, manifest: Manifest, wanted: Sequence[TensorEntry],
              fetched: Future[MappedBlob] | None, own: Sequence[bool] | None) -> WarmRead | None:  # fmt: skip
        whole = 2 * sum(e.nbytes for e in wanted) >= sum(e.nbytes for e in manifest.tensors)
        try:
            blob = fetched.result() if fetched is not None else self._backend.map(warm_key(name), whole)
        except ObjectNotFoundError:
            return None
        if own is not None and not blob.mapped:
            own = [True] * len(wanted)
        owned = [np.empty(e.nbytes, dtype=np.uint8) if o else None for e, o in zip(wanted, own or [False] * len(wanted))]
        try:
            offsets = self._check(blob.view, manifest_id, manifest, wanted, owned)
        except IntegrityError as e:
            _log.warning("the warm copy %s is damaged, reading packs instead: %s", name[:12], e)
            return None
        return WarmRead(
            _arrays(blob.view, offsets, wanted), owned, lambda: _arrays(blob.private(), offsets, wanted), blob.mapped
        )

    def fetch(self, snapshot_id: str) -> Future[MappedBlob]:
        """Start getting the warm copy of ``snapshot_id`` in the background (for ``read``),
        so a remote download overlaps reading the snapshot's records."""
        return self._pool.submit(self._backend.map, warm_key(snapshot_id))

    def verify(self, snapshot: Snapshot, manifest: Manifest) -> None:
        """Check the whole warm copy of ``snapshot`` (``IntegrityError`` if damaged;
        ``ObjectNotFoundError`` if there is none)."""
        self._check(self._backend.map(warm_key(snapshot.id)).view, snapshot.manifest, manifest, manifest.tensors)

    def _check(self, view: memoryview, manifest_id: str, manifest: Manifest, wanted: Sequence[TensorEntry],
               into: Sequence[np.ndarray | None] | None = None) -> list[int]:  # fmt: skip
        """Offsets of ``wanted`` in a warm copy of manifest ``manifest_id``, after checking
        its trailer and hashing every chunk of ``wanted`` (copied first ``into`` the
        arrays given, see ``verify_warm``)."""
        all_offsets = check_warm_trailer(view[-WARM_TRAILER_SIZE:], len(view), manifest_id, manifest.tensors)
        where = {e.path: o for e, o in zip(manifest.tensors, all_offsets)}
        offsets = [where[e.path] for e in wanted]
        verify_warm(view, offsets, wanted, self._pool, into)
        return offsets

    def snapshot_ids(self) -> list[str]:
        """Snapshots (and part manifests) that have a warm copy."""
        return [k.removeprefix(WARM_PREFIX) for k in self._backend.list(WARM_PREFIX)]

    def delete(self, snapshot_id: str) -> None:
        """Remove the warm copy of ``snapshot_id`` if there is one."""
        try:
            self._backend.delete(warm_key(snapshot_id))
        except ObjectNotFoundError:
            pass

    def stored_bytes(self) -> int:
        return sum(self._backend.size(k) for k in self._backend.list(WARM_PREFIX))


__all__ = ["WarmCopies", "WarmRead"]
